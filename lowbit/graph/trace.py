"""Trace a model once and answer producer/consumer questions on its ``torch.fx`` graph."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

from ..errors import LowbitWarning
from ..utils import model_device

ADD_TARGETS = (operator.add, operator.iadd, torch.add)


class GraphTraceWarning(LowbitWarning):
    """torch.fx could not trace the model, so structural passes fall back to safe defaults
    (BatchNorms left unfolded, one reconstruction unit per layer)."""


class _Tracer(fx.Tracer):
    """torch.nn built-ins, lowbit's own layers and quantizers, and the user's leaf types and
    names stay single nodes: their insides are never rewritten by a graph pass."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if type(m).__module__.startswith("lowbit.nn") or type(m).__module__.startswith(
                "lowbit.quant"):
            return True
        return super().is_leaf_module(m, qualname)


class ModelGraph:
    """The traced graph of ``root`` (or, when tracing failed, only ``why`` it failed)."""

    def __init__(self, root: nn.Module, graph: fx.Graph | None, why: str | None = None):
        self.root = root
        self.graph = graph
        self.why = why
        self.nodes: list[fx.Node] = list(graph.nodes) if graph is not None else []
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self._modules = dict(root.named_modules())
        self._calls: dict[str, list[fx.Node]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                self._calls.setdefault(n.target, []).append(n)

    @property
    def traced(self) -> bool:
        return self.graph is not None

    def module(self, node: fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node runs (None for other nodes)."""
        return self._modules.get(node.target) if node.op == "call_module" else None

    def calls(self, name: str) -> list[fx.Node]:
        """Every call site of module ``name``, in execution order."""
        return self._calls.get(name, [])

    def users(self, node: fx.Node) -> list[fx.Node]:
        return list(node.users)

    def order(self) -> list[str]:
        """Called module names in first-call order."""
        return list(self._calls)

    def enclosing(self, node: fx.Node) -> list[str]:
        """Qualified names of the modules whose ``forward`` the node was traced in, outer first."""
        return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]

    def is_add(self, node: fx.Node) -> bool:
        """A two-tensor addition (function, method or ``+``), the merge of a residual branch."""
        if node.op == "call_function" and node.target in ADD_TARGETS:
            pass
        elif not (node.op == "call_method" and node.target in ("add", "add_")):
            return False
        return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2

    def ancestors(self, node: fx.Node) -> set[fx.Node]:
        """Every node ``node`` depends on (not including itself)."""
        seen: set[fx.Node] = set()
        stack = list(node.all_input_nodes)
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(n.all_input_nodes)
        return seen

    def foldable_bn(self, shapes: dict[str, torch.Size] | None = None):
        from .fold import foldable_bn

        return foldable_bn(self, shapes)

    def residual_adds(self):
        from .regions import residual_adds

        return residual_adds(self)

    def chains(self, depthwise_only: bool = True):
        from .chains import rescale_chains

        return rescale_chains(self, depthwise_only)

    def units(self, block_types: Iterable[type[nn.Module]] = ()):
        from .regions import reconstruction_units

        return reconstruction_units(self, tuple(block_types))


def trace_graph(
    model: nn.Module,
    leaf_types: Iterable[type[nn.Module]] = (),
    leaf_names: Iterable[str] = (),
    *,
    warn: bool = True,
) -> ModelGraph:
    """Trace ``model`` with ``torch.fx`` (symbolically: no input needed, nothing is run).

    A model fx cannot trace (data-dependent control flow, unsupported Python) gives a graph with
    ``traced == False`` and a :class:`GraphTraceWarning` naming the cause and the fix.
    """
    try:
        graph = _Tracer(tuple(leaf_types), frozenset(leaf_names)).trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        why = (f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: "
               f"{str(exc).splitlines()[0] if str(exc) else ''}); make forward() traceable or "
               "declare the untraceable submodules' classes as leaf types")
        if warn:
            warnings.warn(why, GraphTraceWarning, stacklevel=2)
        return ModelGraph(model, None, why)
    return ModelGraph(model, graph)


def run_example(model: nn.Module, example_inputs) -> None:
    """One eval-mode forward pass on the example, restoring the train/eval state after."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    dev = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args))
    finally:
        model.train(was_training)


def output_shapes(model: nn.Module, names: Iterable[str], example_inputs) -> dict[str, torch.Size]:
    """Output shape of each named module's first call on the example (forward hooks by module)."""
    shapes: dict[str, torch.Size] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m, i, o, n=name):
            if isinstance(o, torch.Tensor):
                shapes.setdefault(n, o.shape)

        handles.append(mod.register_forward_hook(hook))
    try:
        run_example(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes
