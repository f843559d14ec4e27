"""Post-training quantization algorithms, found by name in a small registry.

Each algorithm is one handler ``(model, config, calib_data, example_inputs, **options) ->
quantized model``; adding one (RAPQ, BRECQ-style reconstruction) is a decorated function.
"""

from . import calibration as _calibration  # noqa: F401,E402  (registers the baseline methods)
from . import rapq as _rapq  # noqa: F401,E402  (registers pot, rapq-quick, rapq, brecq)
from .registry import PTQ_METHODS, ptq, register_ptq

__all__ = ["PTQ_METHODS", "ptq", "register_ptq"]
