"""Quantized layers that take their quantizers as arguments (as Brevitas layers do).

They subclass the float layers so ``weight``/``bias`` keep their state-dict keys; the
quantizers live in ``weight_quant`` and ``input_quant`` (``None`` keeps that side in float).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.base import Quantizer


class QuantLayerMixin:
    """Shared plumbing: quantizer slots and the bit counts the cost model reads."""

    weight_quant: Quantizer | None
    input_quant: Quantizer | None
    bias_quant: nn.Module | None  # int32 bias point (lowbit.nn.points), None unless inserted

    def _init_quant(self, weight_quant: Quantizer | None, input_quant: Quantizer | None) -> None:
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.bias_quant = None

    @property
    def w_bits(self) -> int:
        return self.weight_quant.bits if self.weight_quant is not None else 32

    @property
    def a_bits(self) -> int:
        return self.input_quant.bits if self.input_quant is not None else 32

    def quant_weight(self) -> torch.Tensor:
        w = self.weight
        return self.weight_quant(w) if self.weight_quant is not None else w

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quant(x) if self.input_quant is not None else x

    def quant_bias(self) -> torch.Tensor | None:
        bq = getattr(self, "bias_quant", None)
        if bq is None or self.bias is None:
            return self.bias
        return bq(self.bias, self.input_quant, self.weight_quant)


class QConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight and input pass through quantizers."""

    def __init__(self, *args, weight_quant=None, input_quant=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant, input_quant)

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, weight_quant: Quantizer | None, input_quant: Quantizer | None
    ) -> QConv2d:
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
            weight_quant=weight_quant, input_quant=input_quant,
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.quant_bias())


class QLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` whose weight and input pass through quantizers."""

    def __init__(self, *args, weight_quant=None, input_quant=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant, input_quant)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, weight_quant: Quantizer | None, input_quant: Quantizer | None
    ) -> QLinear:
        q = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
            weight_quant=weight_quant, input_quant=input_quant,
        )
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.quant_bias())


QUANT_LAYERS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QConv2d, nn.Linear: QLinear}


class ChannelClamp(nn.Module):
    """``clamp(x, 0, upper[c])`` with one upper bound per channel (axis 1).

    What ReLU6 becomes when its input channels are divided by per-channel factors ``f_c``
    (``relu6(x) / f = clamp(x / f, 0, 6 / f)``); see :mod:`lowbit.ptq.pot_rescale`. The bounds
    are a buffer, so a saved model keeps them.
    """

    def __init__(self, upper: torch.Tensor):
        super().__init__()
        self.register_buffer("upper", upper.detach().clone().float().reshape(-1))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One clamp with tensor bounds: its backward builds one mask, where
        # minimum(clamp_min(x, 0), upper) built two and split ties (a MobileNetV2 features.2
        # step 1.79 -> 1.41 s, benchmarks/profile_unit.py).
        upper = self.upper.to(x.dtype).reshape([1, -1] + [1] * (x.dim() - 2))
        return torch.clamp(x, torch.zeros_like(upper), upper)
