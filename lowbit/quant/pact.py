"""PACT: parameterized clipping activation (Choi et al., 2018), learned clipping level ``alpha``.

Values are clipped to ``[0, alpha]`` (unsigned, the paper's activations) or ``[-alpha, alpha]``
(signed, e.g. weights) and rounded on the uniform grid of step ``alpha / q`` with ``q = 2^N - 1``
unsigned or ``2^(N-1) - 1`` signed (a symmetric grid: zero-point 0, no most-negative code).

What makes it PACT rather than LSQ is the gradient of the clipping level: rounding is
straight-through (the paper's ``dy_q/dy = 1``), so ``dy/dalpha`` is 1 where the value clips at
the top (-1 at the bottom of a signed range) and 0 inside, where LSQ would also move the step
with the rounding residual. The input gets the straight-through gradient inside the range and
none where it clips (below 0 for unsigned values, as PACT's ReLU).
The paper starts ``alpha`` at 10 and trains from scratch; lowbit starts from pretrained weights,
so ``alpha`` starts at the observer's calibrated range. The paper's L2 penalty on ``alpha`` is
the trainer's ``quant_weight_decay``.

Parameters: ``alpha`` (per channel or per tensor); ``scale = alpha / q`` and ``zero_point = 0``
are derived. ``load_params`` takes ``alpha``, or a ``scale`` alone (``alpha = scale * q``, so
reconstruction methods that write a scale and zero-point work on PACT layers too).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import ConfigError
from .base import EPS, Quantizer, SymmetricLevels
from .registry import register_quantizer


class _PACTQuant(torch.autograd.Function):
    """Codes ``clamp(round(x / s), qmin, qmax)`` with ``s = alpha / q``, output ``codes * s``;
    the same operations as :func:`~.autograd.quantize_to_int`, so the integer form is bit-exact.

    Saves ``u = x / s`` alone and takes both gradients as ``hardtanh_backward`` masks of it (one
    pass each, no boolean tensors to convert): ``x`` passes inside, ``alpha`` sums the clipped
    ends. The bounds are the float32 neighbours that make the strict comparisons of that
    kernel equal PACT's ``u >= qmax`` and ``u < 0`` (unsigned) or ``u <= qmin`` (signed)."""

    @staticmethod
    def forward(ctx, x, alpha, qmin: int, qmax: int):
        scale = alpha / qmax
        u = x / scale
        ctx.signed = qmin < 0
        ctx.bounds = (qmin, qmax)
        ctx.save_for_backward(u)
        ctx.a_shape = alpha.shape
        return torch.round(u).clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        hb = torch.ops.aten.hardtanh_backward
        # unsigned: u == 0 is inside (only u < 0 clips at the bottom)
        low = float(qmin) if ctx.signed else -_TINY
        gx = hb(grad, u, low, float(qmax)) if ctx.needs_input_grad[0] else None
        ga = None
        if ctx.needs_input_grad[1]:
            ga = hb(grad, u, _below(qmax), _INF)  # u >= qmax
            if ctx.signed:
                ga = ga - hb(grad, u, -_INF, _above(qmin))  # u <= qmin
            ga = ga.sum_to_size(ctx.a_shape)
        return gx, ga, None, None


_INF = float("inf")
_TINY = torch.finfo(torch.float32).tiny


@functools.cache
def _below(v: int) -> float:
    """The largest float32 below ``v``."""
    return float(torch.nextafter(torch.tensor(float(v)), torch.tensor(-_INF)))


@functools.cache
def _above(v: int) -> float:
    """The smallest float32 above ``v``."""
    return float(torch.nextafter(torch.tensor(float(v)), torch.tensor(_INF)))


@register_quantizer("pact")
class PACTQuantizer(SymmetricLevels, Quantizer):
    """Learned clipping level; see the module docstring. Symmetric grids only."""

    min_signed_bits = 2
    param_names = ("scale", "zero_point", "alpha")
    derived_params = ("scale", "zero_point")
    required_params = ("alpha",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.symmetric:
            raise ConfigError(
                f"{self._where()}: PACT clips to [0, alpha] or [-alpha, alpha] with zero-point 0; "
                "build it with symmetric=True (or use kind 'lsq' for a learned offset grid)"
            )
        self.alpha = nn.Parameter(torch.ones(1))

    @torch.no_grad()
    def init_from_params(self, scale, zero_point, lo, hi) -> None:
        top = torch.maximum(-lo, hi) if self._is_signed else hi.clamp_min(0)
        top = top.reshape(-1).float().clamp_min(EPS * self.levels)
        self.alpha = nn.Parameter(top.to(self.alpha.device).clone())

    def scale_zero_point(self):
        scale = self.alpha.detach().abs().clamp_min(EPS * self.levels) / self.levels
        return scale, torch.zeros_like(scale)

    def params(self) -> dict[str, torch.Tensor]:
        """The derived scale and zero-point, and the clipping level ``alpha``."""
        return {**super().params(), "alpha": self.alpha.detach().clone()}

    def _missing_params(self, params) -> list[str]:
        return [] if "alpha" in params or "scale" in params else ["alpha"]

    def _load_params(self, params) -> None:
        if "zero_point" in params:
            self._check_zero_point(params["zero_point"])
        alpha = params.get("alpha")
        if alpha is not None:
            alpha = self._check_positive("alpha", alpha)
        if "scale" in params:
            scale = self._check_positive("scale", params["scale"])
            if alpha is None:
                alpha = scale * self.levels
            elif not torch.equal(scale, alpha / self.levels):
                raise ConfigError(f"{self._where()}: a 'pact' scale is alpha / {self.levels}, so "
                                  f"{scale.tolist()} disagrees with alpha; give alpha alone")
        if alpha is not None:
            self._store("alpha", alpha, self.alpha.device)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        qmin, qmax = self.qrange
        alpha = self.broadcast(self.alpha.abs().clamp_min(EPS * self.levels), x)
        return _PACTQuant.apply(x, alpha, qmin, qmax)
