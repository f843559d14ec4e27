"""``producer -> activation -> consumer`` chains, where power-of-two rescaling may move
per-channel factors from one layer to the next without changing the float function."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.layers import ChannelClamp, QuantLayerMixin

PASS_THROUGH = (nn.Identity, nn.ZeroPad2d, nn.ConstantPad2d)


@dataclass
class Chain:
    """One ``producer -> act -> consumer`` pattern of a prepared model (module names)."""

    producer: str
    act: str
    consumer: str
    depthwise: bool


def homogeneous_act(mod: nn.Module | None) -> bool:
    """ReLU, ReLU6 (a Hardtanh clipping at 0 from below) or ChannelClamp: for a positive
    per-channel factor f, act(x / f) = act'(x) / f with act' the same kind of module."""
    if isinstance(mod, (nn.ReLU, ChannelClamp)):
        return True
    return isinstance(mod, nn.Hardtanh) and mod.min_val == 0.0 and mod.max_val > 0.0


def _is_depthwise(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels


def _in_channels(mod: nn.Module) -> int | None:
    if isinstance(mod, nn.Conv2d):
        return mod.in_channels
    return mod.in_features if isinstance(mod, nn.Linear) else None


def _zero_pad(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not F.pad:
        return False
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and not value


def _source(g, node: fx.Node, through) -> tuple[fx.Node | None, bool]:
    """The node feeding ``node`` after skipping ``through`` nodes, and whether every value on
    the way has exactly one consumer (a second consumer would see the rescaled value)."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    while src is not None and len(src.users) == 1 and through(src):
        src = src.args[0] if src.args and isinstance(src.args[0], fx.Node) else None
    return src, src is not None and len(src.users) == 1


def rescale_chains(g, depthwise_only: bool = True) -> tuple[list[Chain], dict[str, str]]:
    """Chains into quantized layers (depthwise convs only, by default) in execution order, and
    why every other candidate layer does not qualify."""
    chains: list[Chain] = []
    skipped: dict[str, str] = {}
    if not g.traced:
        return chains, {"model": g.why}

    def passes(n: fx.Node) -> bool:
        return isinstance(g.module(n), PASS_THROUGH) or _zero_pad(n)

    for name in g.order():
        mod = g.root.get_submodule(name)
        if not isinstance(mod, QuantLayerMixin):
            continue
        depthwise = _is_depthwise(mod)
        if depthwise_only and not depthwise:
            continue
        calls = g.calls(name)
        if len(calls) != 1:
            skipped[name] = f"it is called {len(calls)} times"
            continue
        if getattr(mod, "groups", 1) != 1 and not depthwise:
            skipped[name] = "grouped (not depthwise) convs are not rescaled"
            continue
        act_node, single = _source(g, calls[0], passes)
        if act_node is None or not homogeneous_act(g.module(act_node)):
            skipped[name] = "its input is not a ReLU/ReLU6 output"
            continue
        if not single or len(g.calls(act_node.target)) != 1:
            skipped[name] = f"the output of {act_node.target} is used by more than this layer"
            continue
        prod_node, single = _source(g, act_node,
                                    lambda n: isinstance(g.module(n), nn.Identity))
        prod = g.module(prod_node) if prod_node is not None else None
        if not (single and isinstance(prod, nn.Conv2d) and len(g.calls(prod_node.target)) == 1
                and prod.out_channels == _in_channels(mod)):
            skipped[name] = ("no conv (with its BatchNorm folded) produces its input alone; "
                             "rescaling needs fold_bn and a conv -> ReLU/ReLU6 -> layer chain")
            continue
        chains.append(Chain(prod_node.target, act_node.target, name, depthwise))
    return chains, skipped
