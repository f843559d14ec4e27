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

import torch
from torch import nn

from ..errors import ConfigError
from .base import EPS, Quantizer, SymmetricLevels
from .registry import register_quantizer


class _PACTQuant(torch.autograd.Function):
    """Codes ``clamp(round(x / s), qmin, qmax)`` with ``s = alpha / q``, output ``codes * s``;
    the same operations as :func:`~.autograd.quantize_to_int`, so the integer form is bit-exact."""

    @staticmethod
    def forward(ctx, x, alpha, qmin: int, qmax: int):
        scale = alpha / qmax
        u = x / scale
        top = u >= qmax
        bottom = u <= qmin if qmin < 0 else u < 0
        ctx.signed = qmin < 0
        ctx.save_for_backward(top, bottom)
        ctx.a_shape = alpha.shape
        return torch.round(u).clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        top, bottom = ctx.saved_tensors
        gx = grad.masked_fill(top | bottom, 0.0) if ctx.needs_input_grad[0] else None
        ga = None
        if ctx.needs_input_grad[1]:
            ga = grad * top - grad * bottom if ctx.signed else grad * top
            ga = ga.sum_to_size(ctx.a_shape)
        return gx, ga, None, None


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
