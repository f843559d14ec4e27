"""A short retraining loop for a found config, with loss plug-ins (EBR, distillation).

The Pareto sweep needs to retrain one config per budget; this loop keeps that self-contained.
Full-length retraining (schedules, checkpoints, DDP) belongs to :mod:`lowbit.qat`, which takes
the same loss plug-ins through :func:`lowbit.losses.as_hook`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError, TrainingError
from ..prepare import calibrate, prepare, quantizers
from ..utils import model_device


def retrain(
    model: nn.Module,
    config: QuantConfig,
    data: Iterable,
    example_inputs,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 1e-3,
    quant_lr: float | None = None,
    loss_terms: Sequence = (),
    calib_batches: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Prepare float ``model`` with ``config``, calibrate, and train with Adam + cosine decay.

    Each of ``loss_terms`` is called as ``term(model, inputs, outputs, targets)`` and added to
    the cross-entropy. Returns the quantized model in eval mode.
    """
    from tqdm.auto import tqdm

    if epochs < 0 or (max_steps is not None and max_steps < 1):
        raise ConfigError(f"epochs must be >= 0 and max_steps >= 1, got {epochs}, {max_steps}")
    torch.manual_seed(seed)
    qmodel = prepare(model, config, example_inputs)
    calibrate(qmodel, data, num_batches=calib_batches, progress=progress)
    dev = model_device(qmodel)
    quant_ids = {id(p) for q in quantizers(qmodel) for p in q.parameters()}
    params = [p for p in qmodel.parameters() if p.requires_grad]
    opt = torch.optim.Adam([
        {"params": [p for p in params if id(p) not in quant_ids], "lr": lr},
        {"params": [p for p in params if id(p) in quant_ids], "lr": quant_lr or lr},
    ])
    per_epoch = len(data) if max_steps is None else min(len(data), max_steps)  # type: ignore[arg-type]
    total = max(1, epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_sum = torch.zeros((), device=dev)
    qmodel.train()
    bar = tqdm(total=total, desc="retrain", disable=not progress, leave=False)
    try:
        for _ in range(epochs):
            for i, batch in enumerate(data):
                if i >= per_epoch:
                    break
                x, y = batch[0].to(dev), batch[1].to(dev)
                out = qmodel(x)
                loss = F.cross_entropy(out, y)
                for term in loss_terms:
                    loss = loss + term(qmodel, x, out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach()
                bar.update(1)
    finally:
        bar.close()
    if not math.isfinite(float(loss_sum)):
        raise TrainingError("retraining loss became NaN/Inf; lower lr or the loss-term weights")
    return qmodel.eval()
