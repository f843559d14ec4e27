"""lowbit: low-bit and mixed-precision quantization of PyTorch CNNs.

The public API in one place::

    import lowbit
    qmodel = lowbit.prepare(model, lowbit.QuantConfig.uniform(4, 4), example)
    lowbit.calibrate(qmodel, calib_loader)
    print(lowbit.evaluate(qmodel, eval_loader, reference=model))
    print(lowbit.measure(qmodel, example).table())
"""

from . import export  # a package that is also callable: lowbit.export(qmodel, ...)
from .config import EdgePolicy, LayerRule, QuantConfig, QuantizerSpec
from .cost import CostReport, measure
from .errors import (
    CalibrationError,
    ConfigError,
    DataError,
    LowbitError,
    ModelError,
    TrainingError,
)
from .evaluate import EvalResult, evaluate
from .prepare import calibrate, float_mode, fold_batchnorm, prepare, quantizers, set_mode
from .ptq import (
    BrecqConfig,
    MinMaxConfig,
    MseConfig,
    PercentileConfig,
    PotConfig,
    RapqConfig,
    RapqQuickConfig,
    ptq,
    register_ptq,
)
from .quant import Quantizer, QuantMode, register_quantizer

__version__ = "0.1.0"

__all__ = [
    "BrecqConfig",
    "CalibrationError",
    "ConfigError",
    "CostReport",
    "DataError",
    "EdgePolicy",
    "EvalResult",
    "LayerRule",
    "LowbitError",
    "MinMaxConfig",
    "ModelError",
    "MseConfig",
    "PercentileConfig",
    "PotConfig",
    "QuantConfig",
    "QuantMode",
    "Quantizer",
    "QuantizerSpec",
    "RapqConfig",
    "RapqQuickConfig",
    "TrainingError",
    "calibrate",
    "evaluate",
    "export",
    "float_mode",
    "fold_batchnorm",
    "measure",
    "prepare",
    "ptq",
    "quantizers",
    "register_ptq",
    "register_quantizer",
    "set_mode",
]
