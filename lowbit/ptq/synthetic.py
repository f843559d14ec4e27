"""Class-diverse reconstruction inputs made from a narrow calibration set.

Block reconstruction fits each unit's rounding to the inputs the calibration images give it;
when those images show a few of the model's classes, the rounding is fitted to their features
and pays on the others (docs/calibration.md). Before reconstruction, a share of the
calibration images is pushed by a few input-gradient steps on the float model toward random
target classes (cross-entropy), and, where the model's BatchNorms carry statistics, toward the
training set's per-layer statistics (the BN targets of the BN-guided term, as ZeroQ does from
noise). The copies keep most of the real images' low-level content, and the float model
assigns them to classes spread over all of its outputs. Range calibration is unaffected: it
already ran on the real images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..prepare import float_mode
from .reconstruct import bn_statistics_error

LR = 0.05  # Adam's step on the normalised pixels
BATCH = 128  # images optimised together (their batch statistics are matched)


def diversify(
    qmodel: nn.Module,
    x: torch.Tensor,
    bn_targets: dict | None = None,
    *,
    share: float,
    steps: int,
    batch: int = BATCH,
    seed: int = 0,
) -> torch.Tensor:
    """``x`` with its last ``share`` of images replaced by copies the float model assigns to
    random classes (the batch statistics of the layers in ``bn_targets`` matched as well).

    ``qmodel`` is the prepared, calibrated model; it runs in float mode and is unchanged.
    ``bn_targets`` maps module names of ``qmodel`` to the statistics their outputs should have
    (:func:`lowbit.ptq.reconstruct.bn_targets`).
    """
    n = x.shape[0]
    k = n - int(round(share * n))
    if k == n or steps == 0:
        return x
    gen = torch.Generator().manual_seed(seed)
    mods = {qmodel.get_submodule(name): t for name, t in (bn_targets or {}).items()}
    terms: list[torch.Tensor] = []

    def hook(mod, inputs, out):
        terms.append(bn_statistics_error(out, mods[mod]))

    handles = [m.register_forward_hook(hook) for m in mods]
    grads = [(p, p.requires_grad) for p in qmodel.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)
    was_training = qmodel.training
    qmodel.eval()
    out = x.clone()
    try:
        with float_mode(qmodel), torch.enable_grad():
            for s in range(k, n, batch):
                xb = x[s:s + batch].clone().requires_grad_(True)
                opt = torch.optim.Adam([xb], lr=LR)
                labels = None
                for _ in range(steps):
                    terms.clear()
                    logits = qmodel(xb)
                    if labels is None:
                        if not (isinstance(logits, torch.Tensor) and logits.dim() == 2
                                and logits.shape[1] > 1):
                            return x  # not a classifier: no classes to spread the images over
                        labels = torch.randint(0, logits.shape[1], (xb.shape[0],),
                                               generator=gen).to(logits.device)
                    loss = F.cross_entropy(logits, labels)
                    if terms:
                        loss = loss + torch.stack(terms).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                out[s:s + batch] = xb.detach()
    finally:
        for h in handles:
            h.remove()
        for p, r in grads:
            p.requires_grad_(r)
        qmodel.train(was_training)
    return out
