"""Autograd pieces shared by every quantizer.

Kept in one small module so that each quantizer composes the same straight-through and
gradient-scaling behaviour instead of re-deriving it.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, pass the gradient straight through (identity backward)."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor with a straight-through gradient."""
    return x + (torch.floor(x) - x).detach()


def grad_scale(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Return ``x`` unchanged in the forward pass, with its gradient multiplied by ``scale``.

    LSQ uses this to keep the step-size gradient on the same footing as the weight gradients.
    """
    return (x - x * scale).detach() + x * scale


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient everywhere (use sparingly: it hides clipping)."""
    return x + (x.clamp(lo, hi) - x).detach()


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Uniform affine fake quantization with straight-through rounding.

    ``zero_point`` is integer-valued (held as a float tensor so it broadcasts); values that
    clip get zero gradient with respect to ``x`` and a gradient through ``scale`` (as in LSQ).
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_to_int(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (int32) of ``x``: ``clamp(round(x / scale) + zero_point)``."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return q.to(torch.int32)
