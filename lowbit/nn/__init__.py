"""Quantized layers."""

from .layers import QUANT_LAYERS, QConv2d, QLinear, QuantLayerMixin

__all__ = ["QUANT_LAYERS", "QConv2d", "QLinear", "QuantLayerMixin"]
