"""Uniform affine/symmetric quantizer with fixed (calibrated) parameters.

The forward pass is :func:`fixed_fake_quant`: vectorised in-place passes with a
straight-through gradient inside the clipping range, the same on CPU and CUDA.
"""

from __future__ import annotations

import torch

from .autograd import fixed_fake_quant
from .base import IntegerForm, Quantizer
from .registry import register_quantizer


@register_quantizer("uniform")
class UniformQuantizer(Quantizer):
    """Scale and integer zero-point set by calibration; nothing is learned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))

    def init_from_params(self, scale, zero_point, lo, hi) -> None:
        self.scale = scale.reshape(-1).to(self.scale.device, torch.float32).contiguous()
        self.zero_point = zero_point.reshape(-1).to(self.scale.device, torch.int32).contiguous()

    def scale_zero_point(self):
        return self.scale, self.zero_point.float()

    def _load_params(self, params) -> None:
        dev = self.scale.device
        if "scale" in params:
            self._store("scale", self._check_positive("scale", params["scale"]), dev)
        if "zero_point" in params:
            self._store("zero_point", self._check_zero_point(params["zero_point"]), dev)

    def _params(self, x: torch.Tensor):
        scale = self.broadcast(self.scale, x)
        return 1.0 / scale, scale, self.broadcast(self.zero_point.to(x.dtype), x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        qmin, qmax = self.qrange
        inv, scale, zp = self._params(x)
        return fixed_fake_quant(x, inv, scale, zp, qmin, qmax)

    @torch.no_grad()
    def integer_form(self, x: torch.Tensor) -> IntegerForm:
        """Same operations as :meth:`quantize`, so the integer path is bit-exact."""
        self._check_integer_form()
        qmin, qmax = self.qrange
        inv, _, zp = self._params(x)
        codes = torch.mul(x, inv).round_().add_(zp).clamp_(qmin, qmax).to(torch.int32)
        return self._form(codes, self.scale, self.zero_point)
