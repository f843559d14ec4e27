"""Evaluation of a model on its task's metrics (classification: top-1/top-5, agreement and
logit SQNR; super-resolution: PSNR-Y, SSIM, PSNR against the float model)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .memory import reusing_freed_memory
from .tasks import get_task
from .tasks.classification import EvalResult


@reusing_freed_memory
def evaluate(
    model: nn.Module,
    data: Iterable,
    reference: nn.Module | None = None,
    *,
    progress: bool = True,
    desc: str = "eval",
    channels_last: bool = True,
    task: str | None = None,
    spec=None,
):
    """Score ``model`` on ``(input, target)`` batches with the metrics of ``task`` (default: the
    task of ``spec``, a :class:`lowbit.models.ModelSpec`, else classification); with a
    ``reference`` (the float model), also how far the outputs are from the reference's.
    Classification returns an :class:`EvalResult`.
    """
    name = task or (spec.task if spec is not None else "classification")
    return get_task(name).evaluate(model, data, reference, spec=spec, progress=progress,
                                   desc=desc, channels_last=channels_last)


__all__ = ["EvalResult", "evaluate"]
