"""A minimal supervised training loop (float training and short QAT fine-tuning in the demo).

The full QAT trainer (schedules, checkpoints, DDP, loss plug-ins) lives in ``lowbit.qat``;
this loop stays small on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .utils import model_device


def train_epochs(
    model: nn.Module,
    data: Iterable,
    epochs: int,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    progress: bool = False,
    seed: int = 0,
) -> list[float]:
    """Adam with cosine decay over ``epochs``; returns the mean loss of each epoch."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    dev = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * len(data)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    history = []
    model.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress, leave=False):
        total = torch.zeros((), device=dev)
        n = 0
        for x, y in data:
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
            n += 1
        history.append(float(total) / max(n, 1))
    model.eval()
    return history
