"""One picture of a model's structure, read once with ``torch.fx``, for every algorithm.

``trace_graph(model)`` answers the structural questions lowbit's passes ask — which BatchNorms
can be folded without changing the float function, which activations sit between two layers
(power-of-two rescaling), where residual branches fork and merge, which regions block
reconstruction optimises together — so no pass follows tensors by ``id()`` or knows lowbit's
own model classes.
"""

from .chains import Chain
from .fold import bn_fold_plan
from .trace import GraphTraceWarning, ModelGraph, run_example, trace_graph

__all__ = ["Chain", "GraphTraceWarning", "ModelGraph", "bn_fold_plan", "run_example", "trace_graph"]
