"""The task interface and its registry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from lowbit.errors import ConfigError, DataError


class Task:
    """One kind of model output. Subclasses set ``name`` and implement every method.

    ``evaluate`` returns a result with ``to_dict()`` and ``__str__``; ``ptq_rows`` and
    ``eval_rows`` turn results into the command line's table rows (``model`` plus the metric
    columns they name).
    """

    name = ""

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
