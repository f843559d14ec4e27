"""Reconstruction units and the cache that feeds them without re-running the network.

A *unit* is what block reconstruction optimises at once: a residual block found in the
model's graph when it has one, otherwise a single quantized layer (stem, head, classifier).
The model is traced once with ``torch.fx``, units kept as leaves, so the glue between units
(activations, pooling, padding, additions) becomes a short list of graph nodes. Walking that
list over the whole calibration set once, with every intermediate freed after its last use,
gives each unit its float and quantized inputs at the cost of one network pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from ..errors import ConfigError
from ..graph import trace_graph
from ..memory import reusing_freed_memory


def find_units(
    model: nn.Module, block_types: Iterable[type[nn.Module]] | None = None
) -> list[str]:
    """Names of reconstruction units, read from the model's graph (registration order): the
    residual blocks and their neighbours in the same container, ``block_types`` instances, and
    every quantized layer outside them (see :mod:`lowbit.graph.regions`)."""
    return trace_graph(model).units(tuple(block_types or ()))


def trace_units(model: nn.Module, units: list[str]) -> fx.Graph:
    """fx graph of ``model`` with every unit as one ``call_module`` node."""
    g = trace_graph(model, leaf_names=units, warn=False)
    if not g.traced:
        raise ConfigError(
            f"block reconstruction needs a model torch.fx can trace between blocks: {g.why}; "
            "or use method 'rapq-quick' (no reconstruction)"
        )
    missing = [u for u in units if not g.calls(u)]
    if missing:
        raise ConfigError(
            f"units {missing[:3]} are never called by forward(); they cannot be reconstructed"
        )
    twice = [u for u in units if len(g.calls(u)) > 1]
    if twice:
        raise ConfigError(
            f"units {twice[:3]} are called more than once by forward(); a unit shared by two "
            "places cannot be fitted to both: give each use its own module"
        )
    return g.graph


def run_chunked(fn: Callable, args: tuple, kwargs: dict, n: int, chunk: int):
    """Apply ``fn`` to every batch-sized slice of the tensors of length ``n`` in ``args``.

    Values without the batch dimension (shapes, constants) pass unchanged; an output that
    is not batched (``x.shape``) is computed once on the full arguments. Chunks are written
    into one preallocated output (in the first chunk's memory format), so a large output
    never exists twice, as it would while concatenating a list of chunks.
    """

    def sl(v, s):
        return v[s] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v

    out = None
    with torch.no_grad():
        for start in range(0, n, chunk):
            s = slice(start, min(start + chunk, n))
            a = fx.node.map_aggregate(args, lambda v, s=s: sl(v, s))
            k = fx.node.map_aggregate(kwargs, lambda v, s=s: sl(v, s))
            part = fn(*a, **k)
            if not (isinstance(part, torch.Tensor) and part.dim() > 0
                    and part.shape[0] == s.stop - s.start):
                return fn(*args, **kwargs)
            if s.stop - s.start == n:
                return part
            if out is None:
                fmt = (torch.channels_last if part.dim() == 4 and not part.is_contiguous()
                       and part.is_contiguous(memory_format=torch.channels_last)
                       else torch.contiguous_format)
                out = torch.empty((n, *part.shape[1:]), dtype=part.dtype, device=part.device,
                                  memory_format=fmt)
            out[s] = part
    return out


def _node_fn(node: fx.Node, root: nn.Module) -> Callable:
    if node.op == "call_module":
        return root.get_submodule(node.target)
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return lambda obj, *a, **k: getattr(obj, node.target)(*a, **k)
    raise ConfigError(f"unsupported fx node {node.op} in block reconstruction")


def _fetch_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@reusing_freed_memory
def walk_units(
    graph: fx.Graph,
    units: Iterable[str],
    fp_root: nn.Module,
    q_root: nn.Module,
    inputs: torch.Tensor,
    on_unit: Callable[[str, tuple, torch.Tensor], None],
    chunk: int = 64,
) -> None:
    """Propagate the calibration set through ``graph`` on the float and the quantized model.

    At each unit, ``on_unit(name, q_args, fp_out)`` may change the quantized unit
    (reconstruct it); its quantized output is computed afterwards, so later units see the
    already-reconstructed earlier ones, as BRECQ does. Intermediates are freed at last use,
    the float ones before ``on_unit`` runs: at 224 px the first blocks' inputs are gigabytes.
    """
    units = set(units)
    nodes = list(graph.nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for inp in node.all_input_nodes:
            last_use[inp] = i
    n = inputs.shape[0]
    env_fp: dict[fx.Node, object] = {}
    env_q: dict[fx.Node, object] = {}
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op == "placeholder":
            env_fp[node] = env_q[node] = inputs
        elif node.op == "get_attr":
            env_fp[node] = _fetch_attr(fp_root, node.target)
            env_q[node] = _fetch_attr(q_root, node.target)
        else:
            fp_args = fx.node.map_arg(node.args, lambda a: env_fp[a])
            fp_kwargs = fx.node.map_arg(node.kwargs, lambda a: env_fp[a])
            fp_out = run_chunked(_node_fn(node, fp_root), fp_args, fp_kwargs, n, chunk)
            del fp_args, fp_kwargs
            _release(env_fp, node, i, last_use)
            q_args = fx.node.map_arg(node.args, lambda a: env_q[a])
            q_kwargs = fx.node.map_arg(node.kwargs, lambda a: env_q[a])
            if node.op == "call_module" and node.target in units:
                on_unit(node.target, q_args, fp_out)
            env_fp[node] = fp_out
            env_q[node] = run_chunked(_node_fn(node, q_root), q_args, q_kwargs, n, chunk)
            del q_args, q_kwargs, fp_out
            _release(env_q, node, i, last_use)


def _release(env: dict, node: fx.Node, i: int, last_use: dict) -> None:
    """Drop the values whose last consumer is ``node`` (the ``i``-th)."""
    for inp in node.all_input_nodes:
        if last_use.get(inp) == i:
            env.pop(inp, None)
