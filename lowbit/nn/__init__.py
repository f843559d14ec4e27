"""Quantized layers."""

from .layers import QUANT_LAYERS, ChannelClamp, QConv2d, QLinear, QuantLayerMixin

__all__ = ["QUANT_LAYERS", "ChannelClamp", "QConv2d", "QLinear", "QuantLayerMixin"]
