"""Model surgery: fold BatchNorm, swap supported layers for quantized twins, switch modes.

``prepare`` never edits the caller's model (it works on a deep copy unless ``inplace``), keeps
layers it cannot quantize in float and lists them in the returned model's ``lowbit_report``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import DEPTHWISE, LayerPlan, QuantConfig
from .coverage import ClassCounter, ClassCoverage, warn_if_narrow
from .errors import CalibrationError, ConfigError
from .graph import GraphTraceWarning, ModelGraph, bn_fold_plan, run_example, trace_graph
from .graph.fold import BN_TYPES
from .memory import reusing_freed_memory
from .nn.layers import QUANT_LAYERS, QuantLayerMixin
from .quant.base import Quantizer, QuantMode
from .utils import batch_inputs, model_device


@dataclass
class PrepareReport:
    """What ``prepare`` did: quantized layers with their bits, float layers with the reason."""

    quantized: dict[str, tuple[int, int]] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)
    folded: list[tuple[str, str]] = field(default_factory=list)
    unfolded: dict[str, str] = field(default_factory=dict)  # BN name -> why folding was unsafe
    first_layer: str = ""
    last_layer: str = ""
    policy: dict[str, str] = field(default_factory=dict)
    calib_coverage: ClassCoverage | None = None  # set by ``calibrate`` for classifiers

    def summary(self) -> str:
        lines = [f"quantized {len(self.quantized)} layers, folded {len(self.folded)} BatchNorms"
                 + (f", left {len(self.unfolded)} unfolded" if self.unfolded else "")]
        lines.append(
            f"first layer {self.first_layer!r}: {self.policy.get('first', '')}; "
            f"last layer {self.last_layer!r}: {self.policy.get('last', '')}"
        )
        for name, why in self.kept_float.items():
            lines.append(f"kept in float: {name} ({why})")
        return "\n".join(lines)


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, mod in model.named_modules():
        if name and not any(True for _ in mod.children()):
            yield name, mod


def execution_order(model: nn.Module, example_inputs=None, graph: ModelGraph | None = None
                    ) -> list[str]:
    """Leaf module names in the order forward() first calls them.

    Read from the traced graph; a model fx cannot trace is followed with forward hooks on the
    example (registration order without one). Leaves never called come last.
    """
    leaves = list(_leaf_modules(model))
    leaf_names = {n for n, _ in leaves}
    g = graph if graph is not None else trace_graph(model, warn=False)
    if g.traced:
        called = [n for n in g.order() if n in leaf_names]
    elif example_inputs is not None:
        called = []
        handles = [m.register_forward_hook(lambda mod, i, o, n=n: called.append(n))
                   for n, m in leaves]
        try:
            run_example(model, example_inputs)
        finally:
            for h in handles:
                h.remove()
        called = list(dict.fromkeys(called))
    else:
        return [n for n, _ in leaves]
    seen = set(called)
    return called + [n for n, _ in leaves if n not in seen]


def find_conv_bn_pairs(model: nn.Module, example_inputs=None) -> list[tuple[str, str]]:
    """Conv/linear -> BN pairs that fold without changing the float function (read from the
    model's graph; see :func:`lowbit.graph.fold.foldable_bn` for the rule)."""
    return bn_fold_plan(trace_graph(model, warn=False), example_inputs)[0]


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into the preceding conv/linear's weight and bias."""
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError("cannot fold a BatchNorm without running statistics")
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    layer.weight.mul_(factor.reshape(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_batchnorm(model: nn.Module, example_inputs=None) -> list[tuple[str, str]]:
    """Fold every safe conv->BN pair in place; the BN becomes ``nn.Identity``. Returns the pairs
    (BNs that are not safe to fold are left as they are; ``prepare`` reports why)."""
    pairs = find_conv_bn_pairs(model, example_inputs)
    _fold(model, pairs)
    return pairs


def _fold(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    for conv_name, bn_name in pairs:
        fold_bn_into(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())


def type_label(mod: nn.Module, cls: type | None = None) -> str:
    """The type name config rules match: the class name (of ``cls`` when given, e.g. the float
    class of a quantized layer), or ``DepthwiseConv2d`` for a depthwise Conv2d."""
    name = (cls or type(mod)).__name__
    groups = getattr(mod, "groups", 1)
    if name == "Conv2d" and groups > 1 and groups == getattr(mod, "in_channels", 0):
        return DEPTHWISE
    return name


def _why_float(mod: nn.Module, unfolded: str | None = None) -> str | None:
    """Reason a parameterised leaf stays float, or None if it has no parameters."""
    if not any(True for _ in mod.parameters(recurse=False)):
        return None
    if isinstance(mod, BN_TYPES):
        return f"BatchNorm not folded: {unfolded}" if unfolded else "BatchNorm not folded"
    return f"unsupported layer type {type(mod).__name__}"


def prepare(
    model: nn.Module,
    config: QuantConfig | None = None,
    example_inputs=None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """Return a copy of ``model`` with supported layers swapped for quantized twins.

    ``example_inputs`` (a tensor or tuple) lets lowbit follow the real execution order
    (first/last layer) and find conv→BN pairs in any model; without it, registration order is
    used. The new quantizers start in ``float`` mode: calibrate or train them next.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a lowbit QuantConfig, got {type(config).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = PrepareReport()
    graph = trace_graph(model, warn=False)
    if config.fold_bn and not graph.traced and any(isinstance(m, BN_TYPES)
                                                   for m in model.modules()):
        warnings.warn(f"{graph.why}; its BatchNorms are left unfolded (kept in float)",
                      GraphTraceWarning, stacklevel=2)
    if config.fold_bn:
        report.folded, report.unfolded = bn_fold_plan(graph, example_inputs)
        _fold(model, report.folded)
    order = execution_order(model, example_inputs, graph)
    leaves = dict(_leaf_modules(model))
    quantizable = [(n, type_label(leaves[n])) for n in order if type(leaves[n]) in QUANT_LAYERS]
    plans: dict[str, LayerPlan] = config.resolve(quantizable)
    if quantizable:
        report.first_layer, report.last_layer = quantizable[0][0], quantizable[-1][0]
        report.policy = {"first": config.first_layer.value, "last": config.last_layer.value}
    for name in order:
        mod = leaves[name]
        plan = plans.get(name)
        if plan is None:
            why = _why_float(mod, report.unfolded.get(name))
            if why is not None:
                report.kept_float[name] = why
            continue
        if plan.is_float:
            report.kept_float[name] = plan.reason
            continue
        wq = plan.weight.build() if plan.weight else None
        aq = plan.act.build() if plan.act else None
        for q, role in ((wq, "weight_quant"), (aq, "input_quant")):
            if q is not None:
                q.name = f"{name}.{role}"
                q.static = q is wq
                q.to(mod.weight.device)
        qmod = QUANT_LAYERS[type(mod)].from_float(mod, wq, aq)
        _set_submodule(model, name, qmod)
        report.quantized[name] = (qmod.w_bits, qmod.a_bits)
    model.lowbit_report = report
    model.lowbit_config = config
    return model


def quantizers(model: nn.Module) -> Iterator[Quantizer]:
    for mod in model.modules():
        if isinstance(mod, Quantizer):
            yield mod


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayerMixin]]:
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayerMixin):
            yield name, mod


def set_mode(model: nn.Module, mode: QuantMode | str) -> nn.Module:
    """Put every quantizer in ``float``, ``calibrate`` or ``quantize`` mode."""
    try:
        mode = QuantMode(mode)
    except ValueError:
        raise ConfigError(
            f"unknown mode {mode!r}; choose one of {[m.value for m in QuantMode]}"
        ) from None
    for q in quantizers(model):
        q.mode = mode
    return model


@contextmanager
def float_mode(model: nn.Module):
    """Temporarily run a prepared model in float (e.g. as its own reference)."""
    previous = [(q, q.mode) for q in quantizers(model)]
    set_mode(model, QuantMode.FLOAT)
    try:
        yield model
    finally:
        for q, m in previous:
            q.mode = m


@torch.no_grad()
@reusing_freed_memory
def calibrate(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Observe ranges on ``data`` (an iterable of batches or ``(input, target)`` pairs), then
    set every quantizer's parameters and switch to ``quantize`` mode.

    The data loop stays with the caller (any iterable works), as in AIMET.
    """
    qs = list(quantizers(model))
    if not qs:
        raise ConfigError("model has no quantizers: call lowbit.prepare(model, config) first")
    from tqdm.auto import tqdm

    dev = model_device(model)
    was_training = model.training
    model.eval()
    set_mode(model, QuantMode.CALIBRATE)
    for q in qs:
        q.observer.reset()
    seen = 0
    counter = ClassCounter()
    try:
        total = num_batches if num_batches is not None else _len_or_none(data)
        for batch in tqdm(data, total=total, desc="calibrate", disable=not progress, leave=False):
            if num_batches is not None and seen >= num_batches:
                break
            counter.update(model(batch_inputs(batch).to(dev)))
            seen += 1
        if seen == 0:
            raise CalibrationError(
                "the calibration set is empty: pass at least one batch of data"
            )
        for q in qs:
            q.finish_calibration()
    except BaseException:
        set_mode(model, QuantMode.FLOAT)
        raise
    finally:
        model.train(was_training)
    set_mode(model, QuantMode.QUANTIZE)
    report = getattr(model, "lowbit_report", None)
    coverage = counter.result()
    if report is not None:
        report.calib_coverage = coverage
    warn_if_narrow(coverage)
    return model


def _len_or_none(data) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None
