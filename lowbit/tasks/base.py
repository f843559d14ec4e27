"""The task interface and its registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from lowbit.errors import ConfigError, DataError


class Task:
    """One kind of model output. Subclasses set ``name`` and implement every method.

    ``evaluate`` returns a result with ``to_dict()`` and ``__str__``; ``ptq_rows`` and
    ``eval_rows`` turn results into the command line's table rows (``model`` plus the metric
    columns they name). Training (QAT, the SDQ search) asks the task for its losses
    (``losses``, the first is the default), its training set and its headline metrics.
    """

    name = ""
    losses: tuple[str, ...] = ()
    #: the keys of ``scores``
    score_keys: tuple[str, ...] = ()
    #: whether the logit distillation of lowbit.losses applies to this task's outputs
    distillation = False

    def datasets(self) -> list[str]:
        """Dataset names this task's models accept."""
        raise NotImplementedError

    def build_data(self, spec, dataset: str | None, root, **options: Any):
        """A :class:`lowbit.pipeline.DataBundle` for ``spec`` (the options of ``build_data``)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Iterable, reference: nn.Module | None, *,
                 spec=None, progress: bool, desc: str, channels_last: bool):
        raise NotImplementedError

    def ptq_rows(self, float_res, q_res, label: str) -> tuple[list[dict], list[str]]:
        """Rows of the float and quantized model and the metric column names."""
        raise NotImplementedError

    def eval_rows(self, res, label: str) -> tuple[list[dict], list[str]]:
        """Rows comparing a quantized model (``res``, evaluated with its float reference) with
        that reference."""
        raise NotImplementedError

    def loss(self, name: str, cfg) -> Callable:
        """The training loss ``name`` (one of ``losses``) as ``fn(output, target) -> scalar``;
        ``cfg`` is the :class:`lowbit.qat.TrainConfig` (e.g. its label smoothing)."""
        raise NotImplementedError

    def check_training(self, spec, loss: str, dataset: str) -> None:
        """Refuse, before any loading, a loss the training data cannot feed."""

    def train_dataset(self, dataset: str) -> str:
        """The dataset whose training split trains a model evaluated on ``dataset`` (itself,
        unless it is a test-only set)."""
        return dataset

    def train_set(self, spec, dataset: str, root, *, patch: int | None = None):
        """The training split of ``dataset`` for ``spec`` (``patch``: the training crop of an
        image-to-image task, in output pixels)."""
        raise NotImplementedError

    def scores(self, res) -> dict[str, float]:
        """The headline metrics of an evaluation result (the columns of training histories)."""
        raise NotImplementedError

    def headline(self, scores: dict[str, float]) -> str:
        """``scores`` as one short phrase, e.g. ``top-1 71.20 %``."""
        raise NotImplementedError

    def accepts(self, inputs, targets) -> bool | None:
        """Whether an ``(inputs, targets)`` evaluation batch is data of this task (None: the
        task cannot tell)."""
        return None


_TASKS: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    if not task.name:
        raise ConfigError(f"{type(task).__name__} has no name")
    if task.name in _TASKS and not overwrite:
        raise ConfigError(f"a task named {task.name!r} is already registered; pass "
                          "overwrite=True to replace it")
    _TASKS[task.name] = task
    return task


def _loaded() -> dict[str, Task]:
    from . import load_builtin

    load_builtin()
    return _TASKS


def list_tasks() -> list[str]:
    return sorted(_loaded())


def get_task(name: str) -> Task:
    tasks = _loaded()
    if name not in tasks:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


def loss_names() -> list[str]:
    """Every task's training losses, plus ``kd`` (distillation alone)."""
    return sorted({n for t in _loaded().values() for n in t.losses} | {"kd"})


def loss_function(name: str, cfg) -> Callable:
    """The training loss called ``name`` in whichever task defines it."""
    for task in _loaded().values():
        if name in task.losses:
            return task.loss(name, cfg)
    raise ConfigError(f"unknown loss {name!r}; known losses: {', '.join(loss_names())}")


def check_loss_task(spec, loss: str) -> None:
    """Refuse a loss of another task than the model's (``ce`` for an SR net, ``l1`` for a
    classifier), naming the model's losses."""
    task = get_task(spec.task)
    if loss in task.losses or (loss == "kd" and task.distillation):
        return
    ok = list(task.losses) + (["kd"] if task.distillation else [])
    raise ConfigError(
        f"loss {loss!r} does not apply to {spec.name}, a {spec.task.replace('_', '-')} model: "
        f"use --loss {' or '.join(ok)}"
    )


def _first_batch(data):
    """The first batch of re-iterable ``data`` (None for a one-shot iterator, not consumed)."""
    if data is None or iter(data) is data:
        return None
    return next(iter(data), None)


def resolve_task(task: str | None = None, spec=None, data=None) -> Task:
    """The task whose metrics score a model: ``task`` if given, else the task of ``spec`` (its
    :class:`lowbit.models.ModelSpec`), else the one task that ``data``'s first batch fits.
    A ``task`` other than the spec's, or one the batch does not fit, is refused."""
    if task is not None and spec is not None and task != spec.task:
        raise ConfigError(
            f"task {task!r} does not apply to {spec.name}, a {spec.task.replace('_', '-')} model "
            f"(metrics {', '.join(get_task(spec.task).score_keys)}): pass task={spec.task!r} or "
            "leave task out")
    name = task or (spec.task if spec is not None else None)
    batch = _first_batch(data)
    if name is None:
        if batch is None:
            raise ConfigError("cannot tell the model's task: pass task= (one of "
                              f"{', '.join(list_tasks())}) or a registered model_name")
        fits = [n for n, t in _loaded().items() if t.accepts(*batch[:2]) is True]
        if len(fits) != 1:
            raise ConfigError(
                f"cannot tell the task from the evaluation data (targets of shape "
                f"{tuple(batch[1].shape)} fit {fits or 'no task'}): pass task= (one of "
                f"{', '.join(list_tasks())})")
        name = fits[0]
    found = get_task(name)
    if batch is not None and found.accepts(*batch[:2]) is False:
        raise DataError(
            f"the evaluation data is not {name.replace('_', '-')} data (inputs "
            f"{tuple(batch[0].shape)}, targets {tuple(batch[1].shape)}): its metrics "
            f"({', '.join(found.score_keys)}) cannot score it; give that task's data, or the "
            "task of this data")
    return found


def task_of_dataset(dataset: str) -> str | None:
    """The task whose models read ``dataset`` (None: no task knows the name)."""
    key = dataset.lower()
    for name, task in _loaded().items():
        if key in task.datasets():
            return name
    return None


def check_dataset_task(spec, dataset: str) -> None:
    """Refuse a dataset made for another task than the model's, naming both."""
    owner = task_of_dataset(dataset)
    if owner is not None and owner != spec.task:
        raise DataError(
            f"{dataset} is a {owner.replace('_', '-')} dataset but {spec.name} is a "
            f"{spec.task.replace('_', '-')} model: use -d {spec.default_dataset} (or one of "
            f"{', '.join(get_task(spec.task).datasets())})"
        )
