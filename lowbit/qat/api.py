"""The Python entry point: ``lowbit.qat.qat(model, "qil", train_loader, calib_data=...)``.

It prepares the model with the method's quantizers, initialises them from calibration data,
and trains the stages (one stage, or a progressive list) with the shared trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError
from ..evaluate import evaluate
from ..models import get_spec, list_models
from ..prepare import calibrate, prepare, quantizers
from ..tasks import resolve_task
from .hooks import TrainHook
from .schedule import Stage, parse_stages, run_stages
from .trainer import TrainConfig

METHODS = ("qil", "lsq")


def method_config(
    method: str,
    w_bits: int = 4,
    a_bits: int | None = 4,
    *,
    per_channel: bool = True,
    first_last: str = "8bit",
    observer: str = "mse",
    bn: str = "fold",
    learn_gamma: bool = True,
) -> QuantConfig:
    """The QuantConfig of a QAT method: QIL weights learn ``gamma`` (as in the paper) unless
    ``learn_gamma`` is False; activations keep ``gamma = 1``. ``bn="fold"`` folds BatchNorm."""
    if method not in METHODS:
        raise ConfigError(f"unknown QAT method {method!r}; choose one of {list(METHODS)}")
    config = QuantConfig.uniform(w_bits, a_bits, kind=method, observer=observer,
                                 per_channel=per_channel, first_last=first_last,
                                 fold_bn=bn == "fold")
    if method == "qil" and learn_gamma:
        config = config.model_copy(update={
            "weight": config.weight.model_copy(update={"options": {"learn_gamma": True}})})
    return config


@dataclass
class QATResult:
    """The trained model with its per-epoch history (one row per epoch, every stage)."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)


def _scoring(eval_fn, eval_data, task: str | None, model_name: str | None):
    """The per-epoch evaluation: ``eval_fn``, else the metrics of the model's task on
    ``eval_data`` (None without either)."""
    if eval_fn is not None and task is not None:
        raise ConfigError("give eval_fn or task, not both: eval_fn chooses the metrics itself")
    if eval_fn is not None or eval_data is None:
        return eval_fn
    spec = get_spec(model_name) if model_name in list_models() else None
    scorer = resolve_task(task, spec, eval_data)

    def score(m: nn.Module) -> dict:
        return scorer.scores(evaluate(m, eval_data, progress=False, task=scorer.name, spec=spec))

    return score


def qat(
    model: nn.Module,
    method: str,
    train_data: Iterable,
    *,
    calib_data: Iterable,
    example_inputs=None,
    w_bits: int = 4,
    a_bits: int | None = 4,
    stages: Sequence[Stage] | str | None = None,
    config: QuantConfig | None = None,
    train: TrainConfig | None = None,
    eval_data: Iterable | None = None,
    hooks: Sequence[TrainHook] = (),
    output_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    model_name: str | None = None,
    config_options: dict[str, Any] | None = None,
    calib_batches: int | None = None,
    dist_ctx=None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    task: str | None = None,
) -> QATResult:
    """Quantization-aware training of a float ``model`` (never modified: it is copied).

    ``stages`` (e.g. ``"5/5,4/4,3/3"``) runs progressive fine-tuning; otherwise one stage at
    ``w_bits``/``a_bits``. ``config`` replaces the method's default QuantConfig for a
    single-stage run (e.g. a mixed-precision result, or per-layer quantizer kinds found by
    DQSS: its kinds may differ from ``method``, which then only names the run). ``config_options`` are passed to
    :func:`method_config` (``per_channel``, ``first_last``, ``observer``, ``learn_gamma``).
    ``resume=True`` continues from ``output_dir/checkpoint.pt`` if it exists.

    Each epoch scores the model on ``eval_data`` with ``eval_fn`` if given, else with the
    metrics of ``task`` (default: the task of the registered model ``model_name``, else the
    task whose data ``eval_data`` is; see :func:`lowbit.tasks.resolve_task`).
    """
    train = train or TrainConfig()
    if isinstance(stages, str):
        stages = parse_stages(stages)
    stages = list(stages) if stages else [Stage(w_bits=w_bits, a_bits=a_bits)]
    opts = dict(config_options or {})
    opts["bn"] = train.bn

    def stage_config(stage: Stage) -> QuantConfig:
        if config is not None and len(stages) == 1:
            return config
        return method_config(method, stage.w_bits, stage.a_bits, **opts)

    if method not in METHODS:
        raise ConfigError(f"unknown QAT method {method!r}; choose one of {list(METHODS)}")
    eval_fn = _scoring(eval_fn, eval_data, task, model_name)
    first = stage_config(stages[0])
    if config is not None and (config.fold_bn != (train.bn == "fold")):
        first = first.model_copy(update={"fold_bn": train.bn == "fold"})
    if dist_ctx is not None:
        model = model.to(dist_ctx.device)
    qmodel = prepare(model, first, example_inputs)
    calibrate(qmodel, calib_data, num_batches=calib_batches, progress=train.progress)
    run_info = {"model": model_name or type(model).__name__, "method": method,
                "kinds": sorted({q.kind for q in quantizers(qmodel)}),
                "quant": first.to_dict(), "options": {k: str(v) for k, v in opts.items()}}
    history = run_stages(qmodel, stages, stage_config, train_data, train, hooks=hooks,
                         output_dir=output_dir, run_info=run_info, eval_fn=eval_fn,
                         resume=resume, dist_ctx=dist_ctx)
    qmodel.eval()
    return QATResult(qmodel, history)
