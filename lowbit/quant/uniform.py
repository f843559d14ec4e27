"""Uniform affine/symmetric quantizer with fixed (calibrated) parameters.

Uses torch's fused fake-quantize kernels, which are vectorised on CPU and CUDA and pass the
gradient straight through inside the clipping range.
"""

from __future__ import annotations

import torch

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

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        qmin, qmax = self.qrange
        if self.per_channel and self.scale.numel() > 1:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.ch_axis % x.dim(), qmin, qmax
            )
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, qmin, qmax)

    @torch.no_grad()
    def integer_form(self, x: torch.Tensor) -> IntegerForm:
        """Same arithmetic as the fused kernel (multiply by the reciprocal), so it is bit-exact."""
        self.require_calibrated()
        qmin, qmax = self.qrange
        inv = self._broadcast(1.0 / self.scale, x)
        zp = self._broadcast(self.zero_point, x)
        codes = torch.clamp(torch.round(x * inv) + zp, qmin, qmax).to(torch.int32)
        return IntegerForm(
            codes, self.scale.clone(), self.zero_point.clone(), self.bits, bool(self.signed),
            self.axis,
        )
