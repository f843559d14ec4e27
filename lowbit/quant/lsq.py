"""LSQ: learned step size quantization (Esser et al., ICLR 2020), the standard QAT baseline.

The step size is a trainable parameter whose gradient is scaled by ``1/sqrt(N * Qp)`` so that
it learns at the pace of the weights. It starts from the calibrated range. An asymmetric
variant learns a zero-point too, rounded in every forward pass so it stays an integer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .autograd import grad_scale, learned_fake_quant, round_ste
from .base import EPS, Quantizer
from .registry import register_quantizer


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.ones(1))
        self.zero_point = nn.Parameter(torch.zeros(1), requires_grad=not self.symmetric)

    def init_from_params(self, scale, zero_point, lo, hi) -> None:
        dev = self.scale.device
        self.scale = nn.Parameter(scale.reshape(-1).to(dev, torch.float32).clone())
        self.zero_point = nn.Parameter(
            zero_point.reshape(-1).to(dev, torch.float32).clone(), requires_grad=not self.symmetric
        )

    def scale_zero_point(self):
        qmin, qmax = self.qrange
        zp = torch.round(self.zero_point.detach()).clamp(qmin, qmax)
        return self.scale.detach().abs().clamp_min(EPS), zp

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.require_calibrated()
        qmin, qmax = self.qrange
        per_scale = x.numel() / self.scale.numel()
        g = 1.0 / math.sqrt(per_scale * max(qmax, 1))
        s = self._broadcast(grad_scale(self.scale, g).abs().clamp_min(EPS), x)
        if self.symmetric:
            zp = self._broadcast(self.zero_point.detach(), x)
        else:
            zp = self._broadcast(
                torch.clamp(round_ste(grad_scale(self.zero_point, g)), qmin, qmax), x
            )
        return learned_fake_quant(x, s, zp, qmin, qmax)
