"""Quantization points an integer model needs beyond layer inputs and weights, off by default.

A fake-quant model quantizes each conv/linear's input and weight; what flows between those
points stays float. An integer runtime also needs

* the bias as int32 codes at ``s_x * s_w`` (:class:`BiasQuant`, its scale derived, nothing
  calibrated),
* a grid for every output that is not requantized straight into the next quantizer (a residual
  stream read by two branches, the logits): an output quantizer (``layer.output_quant``),
* residual adds whose two inputs are requantized to one shared scale (:class:`QAdd`), as
  integer kernels (QLinearAdd) add them.

:func:`insert_points` adds them from the graph to a prepared model, before calibration (or
:func:`calibrate_points` calibrates just the new ones on an already-calibrated model). The
simulation then quantizes exactly where the exported integer model does. Nothing here runs
unless inserted, so results of existing methods are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import ConfigError
from ..quant.autograd import round_ste
from ..quant.base import Quantizer, QuantMode
from .layers import QuantLayerMixin

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class BiasQuant(nn.Module):
    """Bias rounded to int32 codes at ``s_x * s_w`` (straight-through), once both quantizers
    quantize; the scale is derived, so there is nothing to calibrate."""

    def forward(self, bias: torch.Tensor, input_quant: Quantizer | None,
                weight_quant: Quantizer | None) -> torch.Tensor:
        if input_quant is None or weight_quant is None:
            return bias
        if input_quant.mode is not QuantMode.QUANTIZE or not input_quant.calibrated \
                or not weight_quant.calibrated:
            return bias
        scale = (input_quant.scale_zero_point()[0] * weight_quant.scale_zero_point()[0]).float()
        codes = round_ste(bias / scale).clamp(INT32_MIN, INT32_MAX)
        return codes * scale


class QAdd(nn.Module):
    """``a + b`` of two inputs on integer grids. An input that already lies on a quantizer's
    grid (the residual stream after an output point) is added as it is (``passthrough``);
    the others are quantized by ``quant`` (the quantizer's observer sees them). Integer kernels
    (QLinearAdd) take one grid per input, so the stream needs no requantization, which
    onnxruntime would run as separate float ops."""

    def __init__(self, quant: Quantizer, passthrough: tuple[bool, bool] = (False, False)):
        super().__init__()
        self.quant = quant
        self.passthrough = tuple(passthrough)

    def extra_repr(self) -> str:
        return f"passthrough={self.passthrough}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pa, pb = self.passthrough
        return (a if pa else self.quant(a)) + (b if pb else self.quant(b))


@dataclass
class PointsReport:
    """Which points were inserted where: biased layers, output quantizers (module name: the
    node whose value it quantizes), QAdd modules."""

    biases: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    adds: list[str] = field(default_factory=list)

    def new_quantizers(self, model: nn.Module) -> list[Quantizer]:
        qs = [model.get_submodule(n) for n in self.outputs]
        return qs + [model.get_submodule(n).quant for n in self.adds]


def _spec(model: nn.Module, bits: int):
    config = getattr(model, "lowbit_config", None)
    if config is None or config.act is None:
        raise ConfigError("quantization points go into a model prepared by lowbit.prepare with "
                          "activation quantization (a config whose act is set)")
    return config.act.model_copy(update={"bits": bits, "per_channel": False, "ch_axis": 0})


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _add_module(gm: fx.GraphModule, name: str, mod: nn.Module) -> str:
    gm.add_submodule(name, mod.to(_device(gm)))
    return name


def insert_points(model: nn.Module, *, bias: bool = True, outputs: bool = True,
                  adds: bool = True, bits: int = 8) -> tuple[nn.Module, PointsReport]:
    """Add the integer model's quantization points to a prepared model (before calibration,
    or see :func:`calibrate_points`).

    The model becomes an fx GraphModule with the same submodule names (state-dict keys kept,
    the points' added). ``adds`` turns every residual add into a :class:`QAdd`; ``outputs``
    puts a ``bits``-bit quantizer (``outq<i>``) wherever a quantized layer's or QAdd's output,
    after the activations that follow it, is not read by exactly one quantizer (it forks into
    two branches, reaches a pool or the model output); ``bias`` quantizes biases to int32 at
    ``s_x * s_w``. Returns the model and what was inserted.
    """
    from ..graph import trace_graph
    from ..graph.ops import chain_end, describe, requant_target

    report = PointsReport()
    spec = _spec(model, bits)
    g = trace_graph(model, warn=False)
    if not g.traced:
        raise ConfigError(f"quantization points need the model's graph: {g.why}")
    graph = g.graph
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    if adds:
        for node in [n for n in g.nodes if g.is_add(n)]:
            name = f"qadd{len(report.adds)}"
            q = spec.build()
            q.name = f"{name}.quant"
            _add_module(gm, name, QAdd(q))
            with graph.inserting_before(node):
                new = graph.call_module(name, tuple(node.args[:2]))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            report.adds.append(name)
    if outputs:
        modules = dict(gm.named_modules())
        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            op = describe(node, modules)
            if op.kind == "layer" and (op.module.weight_quant is None
                                       or op.module.input_quant is None):
                continue
            if op.kind not in ("layer", "qadd") or requant_target(node, modules) is not None:
                continue
            end, _ = chain_end(node, modules)
            name = f"outq{len(report.outputs)}"
            q = spec.build()
            q.name = name
            _add_module(gm, name, q)
            modules[name] = q
            with graph.inserting_after(end):
                new = graph.call_module(name, (end,))
            end.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
            report.outputs[name] = end.name
    if adds:
        modules = dict(gm.named_modules())
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(modules[node.target], QAdd):
                modules[node.target].passthrough = tuple(
                    _on_grid(a, modules) for a in node.args[:2])
    if bias:
        for name, mod in gm.named_modules():
            if isinstance(mod, QuantLayerMixin) and mod.bias is not None \
                    and mod.weight_quant is not None and mod.input_quant is not None:
                mod.bias_quant = BiasQuant()
                report.biases.append(name)
    gm.recompile()
    for attr in ("lowbit_report", "lowbit_config"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm, report


def _on_grid(node, modules: dict[str, nn.Module]) -> bool:
    """The value is a quantizer's output, through ops that keep values on its grid."""
    from ..graph.ops import COMMUTING, describe

    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(modules.get(node.target), Quantizer):
            return True
        if node.op == "placeholder":
            return False
        op = describe(node, modules)
        clamp_off_grid = op.kind == "clamp" and (op.attrs.get("hi") is not None
                                                 or op.attrs.get("lo") not in (None, 0.0))
        if op.kind not in COMMUTING or clamp_off_grid:  # a bound may lie between codes
            return False
        node = op.args[0]
    return False


def share_grids(model: nn.Module, report: PointsReport) -> list[str]:
    """Give each output point the grid of a layer that reads its value with the same kind and
    bits, so the stored tensor has one grid and that layer needs no requantization (what
    calibrating both on the same values gives; after a PTQ method moved the layer's grid, this
    keeps the layer's). Returns the points changed."""
    from ..graph.ops import COMMUTING, describe

    graph = model.graph
    modules = dict(model.named_modules())
    changed = []
    for name in report.outputs:
        point = modules[name]
        node = next(n for n in graph.nodes if n.op == "call_module" and n.target == name)
        stack = list(node.users)
        while stack:
            op = describe(stack.pop(), modules)
            if op.kind in COMMUTING and op.kind != "clamp":
                stack.extend(op.node.users)
                continue
            q = op.module.input_quant if op.kind == "layer" else None
            if q is not None and q.kind == point.kind and q.bits == point.bits \
                    and q.calibrated and not q.per_channel and q.signed == point.signed:
                point.load_params(q.params())
                changed.append(name)
                break
    return changed


@torch.no_grad()
def calibrate_points(model: nn.Module, report: PointsReport, data: Iterable,
                     num_batches: int | None = None, share: bool = True) -> nn.Module:
    """Calibrate only the quantizers :func:`insert_points` added, the others as they are (e.g.
    a model loaded from ``lowbit ptq --save``); ``share`` then applies :func:`share_grids`."""
    new = report.new_quantizers(model)
    if not new:
        return model
    was_training = model.training
    model.eval()
    for q in new:
        q.observer.reset()
        q.mode = QuantMode.CALIBRATE
    try:
        seen = 0
        for batch in data:
            if num_batches is not None and seen >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(_device(model)))
            seen += 1
        for q in new:
            q.finish_calibration()
            q.mode = QuantMode.QUANTIZE
    except BaseException:
        for q in new:
            q.mode = QuantMode.FLOAT
        raise
    finally:
        model.train(was_training)
    if share:
        share_grids(model, report)
    return model
