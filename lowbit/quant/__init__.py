"""Quantizers: each maps a float tensor to its fake-quantized value and owns its parameters."""

from .autograd import clamp_ste, fake_quant, floor_ste, grad_scale, round_ste
from .base import IntegerForm, Quantizer, QuantMode, check_bits, int_range, range_to_params
from .lsq import LSQQuantizer
from .mixture import MixtureQuantizer, mixture_like, strategy_fields
from .observers import OBSERVERS, build_observer, register_observer
from .pact import PACTQuantizer
from .pot import PoTQuantizer
from .qil import QILQuantizer
from .registry import QUANTIZERS, quantizer_class, register_quantizer
from .sdq import SDQQuantizer
from .uniform import UniformQuantizer

__all__ = [
    "OBSERVERS",
    "QUANTIZERS",
    "IntegerForm",
    "LSQQuantizer",
    "MixtureQuantizer",
    "PACTQuantizer",
    "PoTQuantizer",
    "QILQuantizer",
    "QuantMode",
    "Quantizer",
    "SDQQuantizer",
    "UniformQuantizer",
    "build_observer",
    "check_bits",
    "clamp_ste",
    "fake_quant",
    "floor_ste",
    "grad_scale",
    "int_range",
    "mixture_like",
    "quantizer_class",
    "range_to_params",
    "register_observer",
    "register_quantizer",
    "round_ste",
    "strategy_fields",
]
