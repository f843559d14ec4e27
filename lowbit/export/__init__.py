"""Export a calibrated lowbit model as integers that run.

* :func:`export` (also ``lowbit.export``): ONNX QCDQ for onnxruntime, an integer model folder
  or packed low-bit weights;
* :mod:`lowbit.export.integer`: the integer-only reference the formats are checked against;
* :mod:`lowbit.export.onnx_qdq`, :mod:`lowbit.export.packed`: the writers.

onnx and onnxruntime are optional (``pip install lowbit[export]``) and imported only when used.
"""

import sys
import types

from ..errors import ExportError
from .api import FORMATS, export
from .onnx_qdq import ExportReport

__all__ = ["FORMATS", "ExportError", "ExportReport", "export"]


class _CallableModule(types.ModuleType):
    """``lowbit.export(...)`` calls :func:`export` while ``lowbit.export`` stays this package,
    so ``import lowbit.export.integer as m`` and friends keep working."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
