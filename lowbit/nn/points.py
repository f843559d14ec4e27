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
    """``a + b`` with both inputs on one quantizer's grid (one scale, one zero-point); the
    quantizer's observer sees both inputs, so its range covers both."""

    def __init__(self, quant: Quantizer):
        super().__init__()
        self.quant = quant
        self.output_quant: Quantizer | None = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = self.quant(a) + self.quant(b)
        return self.output_quant(y) if self.output_quant is not None else y


@dataclass
class PointsReport:
    """Which points were inserted where."""

    biases: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    adds: list[str] = field(default_factory=list)

    def new_quantizers(self, model: nn.Module) -> list[Quantizer]:
        qs = [model.get_submodule(n).output_quant for n in self.outputs]
        return qs + [model.get_submodule(n).quant for n in self.adds]


def _spec(model: nn.Module, bits: int):
    config = getattr(model, "lowbit_config", None)
    if config is None or config.act is None:
        raise ConfigError("quantization points go into a model prepared by lowbit.prepare with "
                          "activation quantization (a config whose act is set)")
    return config.act.model_copy(update={"bits": bits, "per_channel": False, "ch_axis": 0})


def _with_adds(model: nn.Module, graph: fx.Graph, adds: list[fx.Node], spec) -> nn.Module:
    """The model as an fx GraphModule whose residual adds call :class:`QAdd` modules (the
    other submodules keep their names, so their state-dict keys are unchanged)."""
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    for i, node in enumerate(adds):
        name = f"qadd{i}"
        q = spec.build()
        q.name = f"{name}.quant"
        gm.add_submodule(name, QAdd(q.to(_device(model))))
        with graph.inserting_before(node):
            new = graph.call_module(name, tuple(node.args[:2]))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    gm.recompile()
    for attr in ("lowbit_report", "lowbit_config"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def insert_points(model: nn.Module, *, bias: bool = True, outputs: bool = True,
                  adds: bool = True, bits: int = 8) -> tuple[nn.Module, PointsReport]:
    """Add the integer model's quantization points to a prepared (not yet calibrated, or see
    :func:`calibrate_points`) model, in place where possible.

    ``adds`` turns every residual add into a :class:`QAdd` (the model becomes an fx
    GraphModule with the same submodule names); ``outputs`` gives an output quantizer of
    ``bits`` bits to each quantized layer or QAdd whose output is not requantized straight into
    a quantizer (it feeds two branches, a pool, or the model output); ``bias`` quantizes biases
    to int32 at ``s_x * s_w``. Returns the model and what was inserted.
    """
    from ..export.ops import describe, requant_target, trace
    from ..graph import trace_graph

    report = PointsReport()
    spec = _spec(model, bits)
    if adds:
        g = trace_graph(model, warn=False)
        if not g.traced:
            raise ConfigError(f"add quantization points need the model's graph: {g.why}")
        merges = [n for n in g.nodes if g.is_add(n)]
        if merges:
            model = _with_adds(model, g.graph, merges, spec)
            report.adds = [f"qadd{i}" for i in range(len(merges))]
    if bias:
        for name, mod in model.named_modules():
            if isinstance(mod, QuantLayerMixin) and mod.bias is not None \
                    and mod.weight_quant is not None and mod.input_quant is not None:
                mod.bias_quant = BiasQuant()
                report.biases.append(name)
    if outputs:
        graph = trace(model)
        modules = dict(model.named_modules())
        for node in graph.nodes:
            op = describe(node, modules) if node.op == "call_module" else None
            if op is None or op.kind not in ("layer", "qadd") or op.name in report.outputs:
                continue
            if op.kind == "layer" and (op.module.weight_quant is None
                                       or op.module.input_quant is None):
                continue
            if requant_target(node, modules) is None:
                q = spec.build()
                q.name = f"{op.name}.output_quant"
                op.module.output_quant = q.to(_device(model))
                report.outputs.append(op.name)
    return model, report


@torch.no_grad()
def calibrate_points(model: nn.Module, report: PointsReport, data: Iterable,
                     num_batches: int | None = None) -> nn.Module:
    """Calibrate only the quantizers :func:`insert_points` added, the others as they are (e.g.
    a model loaded from ``lowbit ptq --save``)."""
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
    return model
