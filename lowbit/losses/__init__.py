"""Loss plug-ins for quantization-aware training.

Each is a small callable ``term(model, inputs, outputs, targets) -> scalar tensor`` that a
training loop adds to its task loss. :func:`as_hook` wraps one for the QAT trainer in
:mod:`lowbit.qat` (its ``TrainHook.extra_loss`` point).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .distill import KnowledgeDistillation, kd_loss
from .ebr import EntropyBinRegularizer, bin_entropy, within_bin

LossTerm = Callable[..., torch.Tensor]


def as_hook(term: LossTerm, name: str | None = None) -> Any:
    """A :class:`lowbit.qat.hooks.TrainHook` whose ``extra_loss`` calls ``term``.

    Imported lazily so the loss plug-ins do not depend on the trainer being importable.
    """
    from ..qat.hooks import TrainHook

    class LossTermHook(TrainHook):
        def __init__(self):
            self.name = name or getattr(term, "name", type(term).__name__)
            self.term = term

        def extra_loss(self, ctx):
            return self.term(ctx.model, ctx.inputs, ctx.outputs, ctx.targets)

    return LossTermHook()


__all__ = [
    "EntropyBinRegularizer",
    "KnowledgeDistillation",
    "LossTerm",
    "as_hook",
    "bin_entropy",
    "kd_loss",
    "within_bin",
]
