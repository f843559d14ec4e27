"""Batch augmentation on tensors, applied by the trainer on the device after loading.

Done per batch with one gather instead of per image in the data loader, so it costs one pass over
the batch, needs no worker processes, and draws from torch's RNG (which the trainer seeds per
epoch, so a resumed run sees the same crops). ``crop-flip`` is the CIFAR recipe (pad 4 with zeros
— the dataset mean after normalisation — take a random crop of the original size, flip half the
images); ``flip`` only flips. ImageNet-style datasets augment in the loader instead (random
resized crop), see ``lowbit.data``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Augment = Literal["none", "flip", "crop-flip"]


def augment_batch(x: torch.Tensor, kind: Augment, pad: int = 4) -> torch.Tensor:
    """Randomly crop (after zero padding) and/or flip each image of an NCHW batch."""
    if kind == "none" or x.dim() != 4:
        return x
    b, _, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if kind == "crop-flip":
        x = F.pad(x, (pad, pad, pad, pad))
        rows = rows + torch.randint(0, 2 * pad + 1, (b, 1), device=dev)
        cols = cols + torch.randint(0, 2 * pad + 1, (b, 1), device=dev)
    flip = torch.rand(b, 1, device=dev) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    # advanced indexing puts the gathered H, W before C: the result is NHWC in memory, which
    # is exactly channels_last once permuted back to NCHW
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
