"""What each node of a quantized model's graph is, in the terms every exporter uses.

The integer reference and the ONNX writer walk the same fx graph; :func:`describe` is the one
place that turns a node (a module call, a function, a method) into an :class:`Op`, so both agree
on what is an activation clamp, a pool, a residual add or a reshape, and on what is unknown.
:func:`requant_target` is the one answer to "where is this accumulator requantized": at its
producer when everything between it and the next quantizer commutes with rounding.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ExportError
from ..nn.layers import ChannelClamp, QuantLayerMixin
from ..quant.base import Quantizer
from .trace import ADD_TARGETS, trace_graph

# ops that commute with a monotone rounding to a grid whose zero is a code: an accumulator
# can be requantized before them with the same result as after them
COMMUTING = {"clamp", "maxpool", "flatten", "reshape", "slice", "pad", "identity",
             "pixel_shuffle", "upsample"}


@dataclass
class Op:
    """One node: ``kind`` says what it computes; ``args`` are its graph inputs (nodes or
    constants) and ``attrs`` the kind's own settings."""

    kind: str
    node: fx.Node
    args: list[Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None

    @property
    def name(self) -> str:
        return str(self.node.target) if self.node.op == "call_module" else self.node.name


def trace(model: nn.Module) -> fx.Graph:
    """The model's fx graph, from the one graph reader (:func:`lowbit.graph.trace_graph`).
    Hooks change what a module computes without appearing in the graph, so they are refused."""
    hooked = [n or type(model).__name__ for n, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        raise ExportError(f"module {hooked[0]!r} has forward hooks, which the exported graph "
                          "would silently drop; express what they do as modules or ops in "
                          "forward() and remove them")
    g = trace_graph(model, warn=False)
    if not g.traced:
        raise ExportError(f"export needs the model's graph: {g.why}")
    return g.graph


def _clamp_bounds(mod: nn.Module) -> tuple[float | None, float | None]:
    if isinstance(mod, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(mod, nn.ReLU):
        return 0.0, None
    return float(mod.min_val), float(mod.max_val)  # Hardtanh


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


FLOAT_LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)
FLOAT_MODULES = {"MeanShift"}  # fixed affine maps kept float (EDSR's mean shifts)


def _upsample(node, args, scale, mode, size=None) -> Op:
    """Nearest upsampling by an integer factor (it repeats values, so it acts on codes)."""
    k = scale if not isinstance(scale, (tuple, list)) else tuple(set(scale))
    if isinstance(k, tuple) and len(k) == 1:
        k = k[0]
    if mode != "nearest" or size is not None or not isinstance(k, (int, float)) \
            or float(k) != int(k) or int(k) < 1:
        raise ExportError(f"{node.name}: upsampling is exported as nearest by one integer "
                          f"factor (scale_factor=k, mode='nearest'), got mode {mode!r}, "
                          f"scale_factor {scale!r}, size {size!r}")
    return Op("upsample", node, args, {"factor": int(k)})


def _module_op(node: fx.Node, mod: nn.Module) -> Op:
    args = list(node.args)
    if isinstance(mod, QuantLayerMixin):
        return Op("layer", node, args, module=mod)
    if isinstance(mod, Quantizer):
        return Op("quant", node, args, module=mod)
    if type(mod).__name__ == "QAdd":
        return Op("qadd", node, args, module=mod)
    if isinstance(mod, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
        lo, hi = _clamp_bounds(mod)
        return Op("clamp", node, args, {"lo": lo, "hi": hi})
    if isinstance(mod, ChannelClamp):
        return Op("clamp", node, args, {"lo": 0.0, "hi": mod.upper.detach().clone()})
    if isinstance(mod, (nn.Identity, nn.Dropout)):
        return Op("identity", node, args)
    if isinstance(mod, nn.Flatten):
        return Op("flatten", node, args, {"start": mod.start_dim, "end": mod.end_dim})
    if isinstance(mod, nn.MaxPool2d):
        if mod.dilation not in (1, (1, 1)) or mod.ceil_mode or mod.return_indices:
            raise ExportError(f"{node.target}: MaxPool2d with dilation/ceil_mode/indices is not "
                              "exported; use a plain MaxPool2d")
        return Op("maxpool", node, args, {"kernel": _pair(mod.kernel_size),
                                          "stride": _pair(mod.stride or mod.kernel_size),
                                          "padding": _pair(mod.padding)})
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        if _pair(mod.output_size) != (1, 1):
            raise ExportError(f"{node.target}: AdaptiveAvgPool2d is exported only with output "
                              f"size 1, got {mod.output_size}; use AvgPool2d")
        return Op("avgpool", node, args, {"global": True})
    if isinstance(mod, nn.AvgPool2d):
        return _avgpool(node, args, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                        mod.count_include_pad, mod.divisor_override)
    if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)) and float(mod.value) == 0.0:
        return Op("pad", node, args, {"pad": tuple(mod.padding)})
    if isinstance(mod, nn.PixelShuffle):
        return Op("pixel_shuffle", node, args, {"factor": int(mod.upscale_factor)})
    if isinstance(mod, nn.Upsample):
        return _upsample(node, args, mod.scale_factor, mod.mode, mod.size)
    if isinstance(mod, FLOAT_LAYERS) or type(mod).__name__ in FLOAT_MODULES:
        return Op("float", node, args, module=mod)
    raise ExportError(
        f"layer {node.target!r} ({type(mod).__name__}) is not known to the exporter; it is "
        "unsupported: replace it by supported ops (conv, linear, ReLU/ReLU6/clamp, add, "
        "avg/max pool, flatten) or keep the whole model float"
    )


def _avgpool(node, args, kernel, stride, padding, ceil_mode, include_pad, divisor) -> Op:
    kernel = _pair(kernel)
    padding = _pair(padding)
    if ceil_mode or divisor is not None or (not include_pad and padding != (0, 0)):
        raise ExportError(f"{node.name}: avg pool with ceil_mode, divisor_override or "
                          "count_include_pad=False with padding is not exported")
    return Op("avgpool", node, args, {"global": False, "kernel": kernel,
                                      "stride": _pair(stride or kernel), "padding": padding})


ADDS = set(ADD_TARGETS)
FLATTENS = {torch.flatten}


def _function_op(node: fx.Node) -> Op:
    f, args, kw = node.target, list(node.args), dict(node.kwargs)
    if f in ADDS and "alpha" not in kw:
        return Op("add", node, args[:2])
    if f in (F.relu, torch.relu):
        return Op("clamp", node, args[:1], {"lo": 0.0, "hi": None})
    if f is F.relu6:
        return Op("clamp", node, args[:1], {"lo": 0.0, "hi": 6.0})
    if f is F.hardtanh:
        lo = kw.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kw.get("max_val", args[2] if len(args) > 2 else 1.0)
        return Op("clamp", node, args[:1], {"lo": float(lo), "hi": float(hi)})
    if f in (torch.clamp, torch.clip):
        lo = kw.get("min", args[1] if len(args) > 1 else None)
        hi = kw.get("max", args[2] if len(args) > 2 else None)
        if not all(b is None or isinstance(b, (int, float)) for b in (lo, hi)):
            raise ExportError(f"{node.name}: clamp with tensor bounds is not exported")
        return Op("clamp", node, args[:1], {"lo": lo, "hi": hi})
    if f in FLATTENS:
        return Op("flatten", node, args[:1], {"start": kw.get("start_dim", args[1] if len(args)
                                                               > 1 else 0), "end": -1})
    if f is F.adaptive_avg_pool2d:
        if _pair(kw.get("output_size", args[1] if len(args) > 1 else None)) != (1, 1):
            raise ExportError(f"{node.name}: adaptive_avg_pool2d is exported with output size 1")
        return Op("avgpool", node, args[:1], {"global": True})
    if f is F.avg_pool2d:
        names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override"]
        vals = dict(zip(names, args[1:], strict=False)) | kw
        return _avgpool(node, args[:1], vals["kernel_size"], vals.get("stride"),
                        vals.get("padding", 0), vals.get("ceil_mode", False),
                        vals.get("count_include_pad", True), vals.get("divisor_override"))
    if f is F.max_pool2d:
        names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
        vals = dict(zip(names, args[1:], strict=False)) | kw
        k = _pair(vals["kernel_size"])
        if vals.get("dilation", 1) not in (1, (1, 1)) or vals.get("ceil_mode", False):
            raise ExportError(f"{node.name}: max_pool2d with dilation/ceil_mode is not exported")
        return Op("maxpool", node, args[:1], {"kernel": k, "stride": _pair(vals.get("stride")
                                                                           or k),
                                              "padding": _pair(vals.get("padding", 0))})
    if f is F.pad:
        pad = kw.get("pad", args[1] if len(args) > 1 else None)
        mode = kw.get("mode", args[2] if len(args) > 2 else "constant")
        value = kw.get("value", args[3] if len(args) > 3 else None)
        if mode != "constant" or value not in (None, 0, 0.0):
            raise ExportError(f"{node.name}: only zero padding is exported, got mode {mode!r} "
                              f"value {value!r}")
        return Op("pad", node, args[:1], {"pad": tuple(pad)})
    if f in (torch.cat, torch.concat):
        dim = kw.get("dim", args[1] if len(args) > 1 else 0)
        return Op("concat", node, [list(args[0])], {"dim": dim})
    if f is F.pixel_shuffle:
        return Op("pixel_shuffle", node, args[:1],
                  {"factor": int(kw.get("upscale_factor", args[1] if len(args) > 1 else 0))})
    if f is F.interpolate:
        names = ["size", "scale_factor", "mode"]
        vals = dict(zip(names, args[1:], strict=False)) | kw
        return _upsample(node, args[:1], vals.get("scale_factor"), vals.get("mode", "nearest"),
                         vals.get("size"))
    if f is F.conv2d:  # a conv with constant weights (EDSR's mean shift): kept float
        return Op("float_fn", node, args)
    if f is operator.getitem:
        return Op("getitem", node, args[:1], {"index": args[1]})
    raise ExportError(
        f"operation {node.name!r} ({getattr(f, '__name__', f)}) is not known to the exporter; "
        "it is unsupported: use conv, linear, ReLU/ReLU6/clamp, add, avg/max pool, pad, "
        "slicing or flatten"
    )


def _method_op(node: fx.Node) -> Op:
    m, args = node.target, list(node.args)
    if m in ("view", "reshape"):
        shape = args[1:] if not (len(args) == 2 and isinstance(args[1], (tuple, list))) \
            else list(args[1])
        return Op("reshape", node, args[:1], {"shape": shape})
    if m == "flatten":
        start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        return Op("flatten", node, args[:1], {"start": start, "end": -1})
    if m in ("add", "add_") and len(args) == 2:
        return Op("add", node, args)
    if m in ("contiguous",):
        return Op("identity", node, args[:1])
    if m == "relu":
        return Op("clamp", node, args[:1], {"lo": 0.0, "hi": None})
    if m == "size":
        return Op("size", node, args)
    if m == "mean":
        dims = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
        keep = node.kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if sorted(d % 4 for d in dims) == [2, 3]:
            return Op("avgpool", node, args[:1], {"global": True, "squeeze": not keep})
    raise ExportError(f"method {node.name!r} (.{m}()) is not known to the exporter; it is "
                      "unsupported")


def resolve(a, env: dict):
    """An op argument with graph nodes replaced by their values in ``env`` (tuples too)."""
    if isinstance(a, fx.Node):
        return env[a]
    if isinstance(a, (tuple, list)):
        return type(a)(resolve(x, env) for x in a)
    return a


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> Op:
    """The :class:`Op` a node computes (raises :class:`ExportError` naming unknown ones)."""
    if node.op == "placeholder":
        return Op("input", node, [])
    if node.op == "output":
        return Op("output", node, [node.args[0]])
    if node.op == "call_module":
        return _module_op(node, modules[node.target])
    if node.op == "get_attr":
        owner, _, attr = node.target.rpartition(".")
        value = getattr(modules[owner], attr)
        if isinstance(value, torch.Tensor):
            return Op("const", node, [], {"value": value.detach()})
    if node.op == "call_function":
        op = _function_op(node)
    elif node.op == "call_method":
        op = _method_op(node)
    else:
        raise ExportError(f"graph node {node.name!r} ({node.op}) is not exported; constants "
                          "read from attributes are unsupported")
    if op.kind == "getitem" and _is_slicing(op.attrs["index"]):
        return Op("slice", node, op.args, op.attrs)
    return op


def _is_slicing(index) -> bool:
    idx = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, slice) or i is Ellipsis for i in idx)


def input_quantizer(op: Op) -> Quantizer | None:
    """The quantizer whose grid an op requantizes its input to, if it is one that does."""
    if op.kind == "layer":
        return op.module.input_quant
    if op.kind == "qadd":
        return op.module.quant
    if op.kind == "quant":
        return op.module
    return None


def chain_end(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, Op | None]:
    """Follow ``node``'s value through single-user ops that commute with rounding; returns the
    last node of that chain and the op that reads it (None when several ops or none do)."""
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return cur, None
        op = describe(users[0], modules)
        commutes = op.kind in COMMUTING and op.args and op.args[0] is cur and not (
            op.kind == "clamp" and isinstance(op.attrs.get("hi"), torch.Tensor))
        if not commutes:
            return cur, op
        cur = users[0]


def requant_target(node: fx.Node, modules: dict[str, nn.Module]) -> Quantizer | None:
    """Where the accumulator made at ``node`` is requantized, if it can be done right there:
    the value goes, through ops that commute with rounding, to exactly one quantizer (a
    layer's input quantizer, a quantization point, a QAdd) and to nothing else."""
    end, op = chain_end(node, modules)
    if op is None:
        return None
    q = input_quantizer(op)
    if op.kind == "qadd":
        slots = [a for a, p in zip(op.args[:2], op.module.passthrough, strict=True) if not p]
        return q if end in slots else None
    if q is not None and end in op.args[:1]:
        return q
    return None
