"""Loss plug-ins for quantization-aware training.

Each is a small callable ``term(model, inputs, outputs, targets) -> scalar tensor`` that a
training loop adds to its task loss. :func:`as_hook` wraps one for the QAT trainer in
:mod:`lowbit.qat` (its ``TrainHook.extra_loss`` point).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .distill import KD_TEMPERATURE, KnowledgeDistillation, kd_loss
from .ebr import EntropyBinRegularizer, bin_entropy, within_bin

LossTerm = Callable[..., torch.Tensor]

SAME_TEACHER = "same"


def load_teacher(name: str | None, weights: str | None, float_model: nn.Module) -> nn.Module:
    """The KD teacher: ``float_model`` for ``None`` / ``"same"`` (self-distillation), else the
    registry model ``name`` with ``weights``.

    The float model can teach directly because the quantized student is prepared from a deep
    copy, and :class:`KnowledgeDistillation` never touches its ``requires_grad`` flags.
    """
    if name is None or name == SAME_TEACHER:
        return float_model
    from ..models import get_model

    return get_model(name, weights)


def build_loss_terms(
    student: nn.Module,
    example_inputs: torch.Tensor,
    *,
    ebr: float | None = None,
    ebr_entropy_weight: float = 0.1,
    ebr_tau: float = 0.1,
    teacher: nn.Module | None = None,
    kd_weight: float = 1.0,
    kd_temperature: float = KD_TEMPERATURE,
) -> list[LossTerm]:
    """The EBR / KD loss terms every retraining path uses (``lowbit qat``, the SDQ recipe, the
    Pareto sweep), so they cannot drift apart.

    ``ebr`` of None or 0 leaves EBR off; ``teacher`` None leaves KD off. A teacher is checked
    against the float ``student`` on ``example_inputs`` here, so a class mismatch is a
    :class:`~lowbit.errors.ConfigError` before any training step.
    """
    terms: list[LossTerm] = []
    if teacher is not None:
        kd = KnowledgeDistillation(teacher, kd_temperature, kd_weight)
        kd.check(student, example_inputs)
        terms.append(kd)
    if ebr:
        terms.append(EntropyBinRegularizer(ebr, ebr_entropy_weight, ebr_tau))
    return terms


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
    "SAME_TEACHER",
    "EntropyBinRegularizer",
    "KnowledgeDistillation",
    "LossTerm",
    "as_hook",
    "bin_entropy",
    "build_loss_terms",
    "kd_loss",
    "load_teacher",
    "within_bin",
]
