"""Which conv/linear -> BatchNorm pairs fold without changing the float function."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLD_TARGETS = (nn.Conv2d, nn.Linear)  # the layer types lowbit quantizes


def _producer_reason(g, bn_node: fx.Node, bn: nn.Module, shapes) -> tuple[str | None, str]:
    """(conv name, "") when the BN's input is a foldable layer's output, else (None, reason)."""
    src = bn_node.args[0] if bn_node.args else None
    if not isinstance(src, fx.Node):
        return None, "its input is not a traced tensor"
    layer = g.module(src)
    if layer is None:
        what = src.target if src.op == "call_module" else getattr(src.target, "__name__",
                                                                   str(src.target))
        return None, f"its input comes from {what!r}, not from a conv or linear layer"
    if not isinstance(layer, FOLD_TARGETS):
        return None, (f"its input comes from {src.target} ({type(layer).__name__}), which lowbit "
                      "does not quantize, so there is nothing to fold it into")
    n_calls = len(g.calls(src.target))
    if n_calls != 1:
        return None, f"{src.target} is called {n_calls} times and only one call feeds the BN"
    others = [u.name for u in src.users if u is not bn_node]
    if others:
        return None, (f"the output of {src.target} is also used by {others[0]!r}, which must "
                      "keep the unnormalised value")
    width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    if width != bn.num_features:
        return None, f"{src.target} has {width} outputs and the BN {bn.num_features} features"
    if isinstance(layer, nn.Linear):
        shape = (shapes or {}).get(src.target)
        if shape is None:
            return None, ("a Linear -> BatchNorm fold needs an example input to check that the "
                          "features are the BN's channel axis")
        if len(shape) != 2:
            return None, (f"{src.target} outputs {len(shape)}-d tensors: the BN normalises axis "
                          "1, not the linear layer's feature axis")
    return src.target, ""


def foldable_bn(g, shapes: dict[str, torch.Size] | None = None):
    """Conv/linear -> BN pairs that are safe to fold, and every other BN with the reason.

    Safe means the BN is called once, its input is the output of a conv/linear module that is
    called once, and that output has no other consumer; anything else would change the float
    function. ``shapes`` (module output shapes from an example run) lets a Linear -> BN1d fold
    be checked; without it such pairs are left unfolded.
    """
    pairs: list[tuple[str, str]] = []
    unsafe: dict[str, str] = {}
    if not g.traced:
        for name, mod in g.root.named_modules():
            if isinstance(mod, BN_TYPES):
                unsafe[name] = g.why
        return pairs, unsafe
    for name, mod in g.root.named_modules():
        if not isinstance(mod, BN_TYPES):
            continue
        calls = g.calls(name)
        if not calls:
            unsafe[name] = "it is never called by forward()"
            continue
        if len(calls) > 1:
            unsafe[name] = f"it is called {len(calls)} times"
            continue
        if mod.running_mean is None or mod.running_var is None:
            unsafe[name] = "it has no running statistics (track_running_stats=False)"
            continue
        conv, why = _producer_reason(g, calls[0], mod, shapes)
        if conv is None:
            unsafe[name] = why
        else:
            pairs.append((conv, name))
    pairs.sort(key=lambda p: g.index[g.calls(p[1])[0]])
    return pairs, unsafe


def bn_fold_plan(g, example_inputs=None) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """:func:`foldable_bn` on ``g``, with the example run (when given) supplying the output
    shapes that decide Linear -> BN folds."""
    shapes = None
    if g.traced and example_inputs is not None:
        from .trace import output_shapes

        linears = [n for n in g.order() if isinstance(g.root.get_submodule(n), nn.Linear)]
        shapes = output_shapes(g.root, linears, example_inputs) if linears else {}
    return foldable_bn(g, shapes)
