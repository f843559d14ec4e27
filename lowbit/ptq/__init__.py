"""Post-training quantization algorithms: one typed config and one registered handler each.

``lowbit.ptq(model, "rapq", data, iters=300)`` or ``lowbit.ptq(model, RapqConfig(iters=300),
data)``; adding a method is a config class (:mod:`lowbit.ptq.configs`) and a handler decorated
with ``@register_ptq(ThatConfig)``.
"""

from . import calibration as _calibration  # noqa: F401,E402  (registers the range methods)
from . import rapq as _rapq  # noqa: F401,E402  (registers pot, rapq-quick, rapq, brecq)
from .configs import (
    BrecqConfig,
    MethodConfig,
    MinMaxConfig,
    MseConfig,
    PercentileConfig,
    PotConfig,
    RapqConfig,
    RapqQuickConfig,
)
from .registry import PTQ_METHODS, load_method_config, method_config, ptq, register_ptq

__all__ = [
    "PTQ_METHODS",
    "BrecqConfig",
    "MethodConfig",
    "MinMaxConfig",
    "MseConfig",
    "PercentileConfig",
    "PotConfig",
    "RapqConfig",
    "RapqQuickConfig",
    "load_method_config",
    "method_config",
    "ptq",
    "register_ptq",
]
