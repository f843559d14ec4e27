"""Residual merges and the reconstruction units derived from them.

A residual block is the region between a fork (a value read by two branches) and the add that
merges them; as a unit it is the innermost module whose ``forward`` holds the whole region. The
modules beside such blocks in the same container (the stem and head convolutions next to
MobileNetV2's inverted residuals, a stride-2 block without a skip) are units too, as BRECQ
treats them; every other quantized layer is a unit of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ..nn.layers import QuantLayerMixin


@dataclass
class Merge:
    """A residual add, the node its two branches fork from, and the region between them."""

    add: fx.Node
    fork: fx.Node
    region: list[fx.Node]  # nodes after the fork that the add depends on, and the add


def residual_adds(g) -> list[Merge]:
    """Every two-input add whose branches share an ancestor, in execution order."""
    merges: list[Merge] = []
    if not g.traced:
        return merges
    for node in g.nodes:
        if not g.is_add(node):
            continue
        a, b = node.args[0], node.args[1]
        common = (g.ancestors(a) | {a}) & (g.ancestors(b) | {b})
        common = {n for n in common if n.op != "get_attr"}
        if not common:
            continue
        fork = max(common, key=g.index.__getitem__)
        inside = g.ancestors(node) - g.ancestors(fork) - {fork}
        region = sorted(inside | {node}, key=g.index.__getitem__)
        merges.append(Merge(node, fork, region))
    return merges


def _common_module(paths: list[list[str]]) -> str:
    """The innermost module name every path (outer-first module stacks) passes through."""
    if not paths or any(not p for p in paths):
        return ""
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return common[-1] if common else ""


def _has_quant_layer(mod: nn.Module) -> bool:
    return any(isinstance(m, QuantLayerMixin) for m in mod.modules())


def _called_once(g, name: str) -> bool:
    """A module whose forward ran exactly once: leaves count their call nodes, other modules
    the distinct stack entries that name them (fx suffixes repeated calls' keys)."""
    if g.calls(name):
        return len(g.calls(name)) == 1
    keys = {key for n in g.nodes for key, (path, _) in n.meta.get("nn_module_stack", {}).items()
            if path == name}
    return len(keys) == 1


def block_names(g) -> list[str]:
    """Modules that hold a residual region whole (one per merge that has a non-root owner)."""
    blocks: list[str] = []
    for m in residual_adds(g):
        owner = _common_module([g.enclosing(n) for n in m.region])
        if owner and owner not in blocks:
            blocks.append(owner)
    return blocks


def reconstruction_units(g, block_types: tuple[type[nn.Module], ...] = ()) -> list[str]:
    """Names of the reconstruction units of a prepared model, in registration order.

    Units are residual blocks found in the graph, instances of their classes (the same block
    without its skip), the other modules of the containers that hold them, and ``block_types``
    the caller names; then every quantized layer outside those is a unit alone. An untraced
    model gets one unit per quantized layer.
    """
    modules = dict(g.root.named_modules())
    blocks = [b for b in block_names(g) if _called_once(g, b)]
    # keep the innermost: a block inside another block leaves the outer one to its parts
    blocks = [b for b in blocks if not any(o.startswith(b + ".") for o in blocks)]
    block_classes = {type(modules[b]) for b in blocks} | set(block_types)
    containers = {b.rpartition(".")[0] for b in blocks if "." in b}

    def holds_block(name: str) -> bool:
        return any(b.startswith(name + ".") for b in blocks)

    def candidate(name: str, mod: nn.Module) -> bool:
        if name in blocks:
            return True
        if not _has_quant_layer(mod) or holds_block(name) or not _called_once(g, name):
            return False
        return isinstance(mod, tuple(block_classes)) or name.rpartition(".")[0] in containers

    units: list[str] = []
    for name, mod in modules.items():
        if not name or any(name.startswith(u + ".") for u in units):
            continue
        if isinstance(mod, QuantLayerMixin) or (g.traced and candidate(name, mod)):
            units.append(name)
    return units
