"""Export a calibrated lowbit model as integers that run.

* :func:`export` (also ``lowbit.export``): ONNX QCDQ for onnxruntime, an integer model folder
  or packed low-bit weights;
* :mod:`lowbit.export.integer`: the integer-only reference the formats are checked against;
* :func:`bit_exact`: the fake-quant model with the integer model's arithmetic (bit for bit);
* :mod:`lowbit.export.onnx_qdq`, :mod:`lowbit.export.packed`: the writers.

onnx and onnxruntime are optional (``pip install lowbit[export]``) and imported only when used.
"""

import sys
import types

from ..errors import ExportError
from .api import FORMATS, export
from .onnx_qdq import ExportReport
from .simulate import BitExact, agreement, bit_exact

__all__ = ["FORMATS", "BitExact", "ExportError", "ExportReport", "agreement", "bit_exact",
           "export"]


class _CallableModule(types.ModuleType):
    """``lowbit.export(...)`` calls :func:`export` while ``lowbit.export`` stays this package,
    so ``import lowbit.export.integer as m`` and friends keep working."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
