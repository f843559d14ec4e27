"""Plug-in points of the QAT trainer.

Distillation, bin regularisers and bitwidth annealing all need the same few places: an extra
loss term per step and callbacks at epoch boundaries. A hook subclasses :class:`TrainHook` and
overrides what it needs; its state travels in the checkpoint so a resumed run is identical.
Distillation and EBR are loss plug-ins in :mod:`lowbit.losses`, adapted by ``as_hook``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class StepContext:
    """What a hook sees at one training step (tensors are live: do not sync on them)."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    outputs: torch.Tensor
    loss: torch.Tensor
    epoch: int
    step: int
    stage: int = 0


class TrainHook:
    """Base class: every method is optional. ``name`` labels the hook's loss in the logs."""

    name = "hook"

    def on_train_start(self, trainer: Any) -> None:
        """Called once before the first epoch (after resuming)."""

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """Called at the start of every epoch, before the first batch."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups of this hook's own parameters (``params``, ``lr``, ``name``): they
        leave the trainer's default groups, e.g. to get their own learning rate."""
        return []

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        """A scalar added to the task loss at this step, or None."""
        return None

    def on_step_end(self, ctx: StepContext) -> None:
        """Called after the optimizer step (``trainer.stop()`` from here ends the run)."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        """Called after an epoch's metrics are known, before its checkpoint is written."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives to store in the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

