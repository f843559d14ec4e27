"""Float training on the shared trainer (the demo's digits CNN, the tests' small models).

A thin front to :class:`lowbit.qat.Trainer`: Adam with cosine decay over ``epochs``, cross
entropy, no checkpoints; every training-like loop runs on that one trainer.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def train_epochs(
    model: nn.Module,
    data: Iterable,
    epochs: int,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    progress: bool = False,
    seed: int = 0,
) -> list[float]:
    """Train a float ``model`` in place; returns the mean loss of each epoch."""
    from .qat.trainer import TrainConfig, Trainer

    cfg = TrainConfig(epochs=epochs, optimizer="adam", lr=lr, weight_decay=weight_decay,
                      schedule="cosine", bn="train", channels_last=False, logger="none",
                      seed=seed, progress=progress)
    history = Trainer(model, data, cfg, float_ok=True).fit()
    model.eval()
    return [row["loss"] for row in history]
