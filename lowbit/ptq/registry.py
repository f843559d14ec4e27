"""Registry and entry point for post-training quantization methods."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError

PTQ_METHODS: dict[str, Callable[..., nn.Module]] = {}


def register_ptq(*names: str):
    """Register a PTQ handler under one or more method names."""

    def wrap(fn):
        for n in names:
            PTQ_METHODS[n] = fn
        return fn

    return wrap


def ptq(
    model: nn.Module,
    method: str,
    calib_data: Iterable,
    config: QuantConfig | None = None,
    example_inputs=None,
    **options,
) -> nn.Module:
    """Quantize a float ``model`` with the PTQ ``method`` on ``calib_data``; returns a copy."""
    if method not in PTQ_METHODS:
        raise ConfigError(f"unknown PTQ method {method!r}; choose one of {sorted(PTQ_METHODS)}")
    return PTQ_METHODS[method](
        model, config or QuantConfig(), calib_data, example_inputs, method=method, **options
    )
