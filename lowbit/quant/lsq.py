"""LSQ: learned step size quantization (Esser et al., ICLR 2020), the standard QAT baseline.

The step size is a trainable parameter whose gradient is scaled by ``1/sqrt(N * Qp)`` so that
it learns at the pace of the weights. It starts from the calibrated range. An asymmetric
variant learns a zero-point too, rounded in every forward pass so it stays an integer.

Signed 1 bit is binary: ``s * sign(w)`` with ``sign(0) = +1`` and codes in {-1, +1}. The step
starts at ``mean(|w|)`` (per channel or per tensor), the closed-form minimiser of
``||w - s * sign(w)||^2`` used by XNOR-Net; the range-based start of the other bitwidths would
be ``max(|w|)``, several times too large for a Gaussian-like weight. ``s`` then learns with the
exact gradient ``sum(g * sign(w))`` (LSQ's gradient scale with ``Qp = 1``), and ``w`` gets the
straight-through gradient inside ``|w| <= s`` (see :func:`~.autograd.binary_fake_quant`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .autograd import binary_codes, binary_fake_quant, grad_scale, learned_fake_quant, round_ste
from .base import EPS, IntegerForm, Quantizer
from .registry import register_quantizer


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    min_signed_bits = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.ones(1))
        self.zero_point = nn.Parameter(torch.zeros(1), requires_grad=not self.symmetric)
        self._abs_sum: torch.Tensor | None = None
        self._abs_batches = 0

    def _check_bits(self, bits: int, signed: bool | None) -> int:
        bits = super()._check_bits(bits, signed)
        if bits == 1 and signed and not self.symmetric:
            raise ConfigError(
                f"{self._where()}: binary (signed 1-bit) quantization is symmetric ({{-s, +s}}, "
                "zero-point 0); use symmetric=True, or at least 2 bits for asymmetric ranges"
            )
        return bits

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Also record ``mean(|x|)`` at 1 bit: the binary step's starting value."""
        seen = self.observer.batches
        super().observe(x)
        if self.bits != 1 or self.signed is False or self.observer.batches == seen:
            return
        if self.per_channel:
            a = x.detach().abs().movedim(self.ch_axis % x.dim(), 0)
            mean = a.reshape(a.shape[0], -1).mean(1)
        else:
            mean = x.detach().abs().mean().reshape(1)
        mean = mean.to(torch.float32)
        self._abs_sum = mean if self._abs_sum is None else self._abs_sum + mean
        self._abs_batches += 1

    def finish_calibration(self) -> None:
        try:
            super().finish_calibration()
        finally:
            self._abs_sum, self._abs_batches = None, 0

    def init_from_params(self, scale, zero_point, lo, hi) -> None:
        if self.binary and self._abs_sum is not None:
            scale = (self._abs_sum / self._abs_batches).clamp_min(EPS)
            zero_point = torch.zeros_like(scale)
        dev = self.scale.device
        self.scale = nn.Parameter(scale.reshape(-1).to(dev, torch.float32).clone())
        self.zero_point = nn.Parameter(
            zero_point.reshape(-1).to(dev, torch.float32).clone(), requires_grad=not self.symmetric
        )

    def scale_zero_point(self):
        qmin, qmax = self.qrange
        zp = torch.round(self.zero_point.detach()).clamp(qmin, qmax)
        return self.scale.detach().abs().clamp_min(EPS), zp

    def _load_params(self, params) -> None:
        dev = self.scale.device
        if "scale" in params:
            self._store("scale", self._check_positive("scale", params["scale"]), dev)
        if "zero_point" in params:
            self._store("zero_point", self._check_zero_point(params["zero_point"]).float(), dev)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        qmin, qmax = self.qrange
        per_scale = x.numel() / self.scale.numel()
        g = 1.0 / math.sqrt(per_scale * max(qmax, 1))
        if self.binary:
            return binary_fake_quant(x, self.broadcast(self.scale.abs().clamp_min(EPS), x), g)
        s = self.broadcast(grad_scale(self.scale, g).abs().clamp_min(EPS), x)
        if self.symmetric:
            zp = self.broadcast(self.zero_point.detach(), x)
        else:
            zp = self.broadcast(
                torch.clamp(round_ste(grad_scale(self.zero_point, g)), qmin, qmax), x
            )
        return learned_fake_quant(x, s, zp, qmin, qmax)

    @torch.no_grad()
    def integer_form(self, x: torch.Tensor) -> IntegerForm:
        """Binary codes are the signs (rounding ``x / s`` would give ternary codes)."""
        if not self.binary:
            return super().integer_form(x)
        self._check_integer_form()
        scale, zp = self.scale_zero_point()
        return self._form(binary_codes(x), scale, zp)
