"""Exact integer sums of a conv/linear on integer codes, with torch's fast float kernels.

Integers add exactly in floating point while every partial sum is an integer of magnitude
below ``2**p`` (``p = 24`` for float32, ``53`` for float64), in whatever order a kernel adds
them. Each output sums ``k`` products (the fan-in: per group for grouped convs), so every
partial sum is at most ``k * max|x| * max|w|``. ``max|x|`` comes from the input grid's code
range (the codes are clamped to it), ``max|w|`` from the weight codes, so the bound is proved
before any input is seen, and :func:`plan_sums` picks the fastest path it proves exact:

* ``float32``: the products' bound is below ``2**24``;
* ``float32-split``: the weights split as ``SPLIT * high + low``, two float32 sums that each
  fit, recombined in float64;
* ``float64``: the bound is below ``2**53`` (torch's float64 kernels are slower);
* ``int64``: torch's integer conv/linear, exact below ``2**63``, and slowest by far.

The proof needs kernels that multiply and add (direct or GEMM), as torch's CPU kernels do;
GPU libraries may pick transforms (Winograd, FFT) or TF32 that round, so sums of tensors on
another device are computed on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExportError

FLOAT32_EXACT = 2**24  # float32 holds every integer below this exactly
FLOAT64_EXACT = 2**53
INT64_EXACT = 2**63
SPLIT = 16  # weight codes split as SPLIT * high + low, low in [0, SPLIT)
PATHS = ("float32", "float32-split", "float64", "int64")


@dataclass(frozen=True)
class SumPlan:
    """How a layer's sums are computed, and the bound that proves the path exact."""

    path: str
    bound: int  # no partial or final sum exceeds this in magnitude


def plan_sums(codes: torch.Tensor, x_bound: int) -> SumPlan:
    """The fastest exact path for weight codes ``codes`` (int64, zero-point removed, output
    channels first) on input codes of magnitude at most ``x_bound``."""
    k = codes[0].numel() if codes.numel() else 0
    w_max = int(codes.abs().max()) if codes.numel() else 0
    bound = k * x_bound * w_max
    if bound < FLOAT32_EXACT:
        return SumPlan("float32", bound)
    if k * x_bound * max(SPLIT, w_max // SPLIT + 1) < FLOAT32_EXACT:
        return SumPlan("float32-split", bound)
    if bound < FLOAT64_EXACT:
        return SumPlan("float64", bound)
    if bound < INT64_EXACT:
        return SumPlan("int64", bound)
    raise ExportError(f"integer sums up to {bound} do not fit int64: the codes are too wide")


def _sums(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Conv2d):
        return F.conv2d(x, w, None, mod.stride, mod.padding, mod.dilation, mod.groups)
    return F.linear(x, w)


def exact_sums(mod: nn.Module, x: torch.Tensor, codes: torch.Tensor, plan: SumPlan,
               dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``mod``'s conv/linear (zero padding) of int64 input codes ``x`` (magnitudes within the
    plan's ``x_bound``) with weight codes ``codes``: exact sums as int64, or as float64 holding
    them exactly (``dtype=torch.float64``, which saves a conversion before float arithmetic;
    not on the ``int64`` path, whose sums may not fit)."""
    if dtype == torch.float64 and plan.path == "int64":
        raise ExportError("sums on the int64 path may not fit float64")
    if x.device.type != "cpu":
        return exact_sums(mod, x.cpu(), codes, plan, dtype).to(x.device)
    w = codes.cpu()
    if plan.path == "int64":
        return _sums(mod, x, w)
    if plan.path == "float64":
        return _sums(mod, x.to(torch.float64), w.to(torch.float64)).to(dtype)
    xf = x.to(torch.float32)
    if plan.path == "float32":
        return _sums(mod, xf, w.to(torch.float32)).to(dtype)
    high = torch.div(w, SPLIT, rounding_mode="floor")
    low = w - SPLIT * high
    acc = _sums(mod, xf, high.to(torch.float32)).to(torch.float64).mul_(SPLIT)
    return acc.add_(_sums(mod, xf, low.to(torch.float32))).to(dtype)
