"""Cost model: weight memory, MACs, BitOPs and activation memory per layer."""

from .model import CostReport, LayerCost, measure

__all__ = ["CostReport", "LayerCost", "measure"]
