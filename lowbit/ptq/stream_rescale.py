"""Power-of-two-aware rescaling of linear streams (MobileNet's residual stream).

In an inverted-residual network the projection convs have no activation: their outputs, and
the sums of them along the skip connections, form a *stream* that only convs read. Such a
stream is linear in its producers, so multiplying every producer (weights and bias) by one
factor ``a > 0`` and dividing every conv that reads the stream by ``a`` leaves the float
network unchanged, while it slides all the stream's power-of-two activation grids at once.
The stream's tensors are where the signed, per-tensor, 4-bit activation quantizers of these
networks sit, and a power-of-two step can be up to a factor sqrt(2) from the best float step.

Streams are found on a ``torch.fx`` trace of the prepared model (quantized layers as leaves),
since the additions are functional and module hooks do not see them. A stream is accepted only
if every tensor in it is a quantized layer's output or an addition of stream tensors, and every
reader is a quantized layer; anything else (an activation, pooling, the model output) leaves the
stream alone, with the reason reported. The factor (one octave, ``grid`` values) minimises the
summed relative quantization error of the readers' inputs (asymmetric: at the best exponent and
zero-point, which the reconstruction's exponent search then looks for).

Opt-in and not recommended yet: on MobileNetV2 W4A4 full RAPQ it started from a lower network
error but ended worse (39.81 % against 59.67 %, docs/rapq.md); kept for experiments.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.layers import QuantLayerMixin
from ..prepare import float_mode
from ..quant.pot import choose_exponent, round_exponent
from .pot_rescale import RescaleReport, _act_samples

ADDS = (operator.add, torch.add, operator.iadd)
ZP_SHIFTS = (-3, -2, -1, 0, 1, 2, 3)  # zero-points tried around the one anchored at the minimum
EXPONENT_TRIES = 4


@dataclass
class Stream:
    """Producers write the stream (each scaled by the factor); readers read it (divided)."""

    producers: list[str]
    readers: list[str]


def _trace(qmodel: nn.Module):
    import torch.fx as fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, mod, qualname):
            return isinstance(mod, QuantLayerMixin) or super().is_leaf_module(mod, qualname)

    return Tracer().trace(qmodel)


def find_streams(qmodel: nn.Module) -> tuple[list[Stream], dict[str, str]]:
    """Linear streams of a prepared model, and why candidate streams were left alone (keyed by
    their first producer). A stream needs at least one reader; a producer whose output goes
    straight into an activation is not a candidate at all."""
    try:
        graph = _trace(qmodel)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no streams known
        return [], {"(model)": f"torch.fx cannot trace it ({type(exc).__name__}: {exc}); "
                               "streams are not rescaled"}
    mods = dict(qmodel.named_modules())

    def kind(node) -> str:
        if node.op == "call_module" and isinstance(mods.get(node.target), QuantLayerMixin):
            return "layer"
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.Identity):
            return "identity"
        if node.op == "call_function" and node.target in ADDS and len(node.args) == 2 and all(
                isinstance(a, torch.fx.Node) for a in node.args) and not node.kwargs:
            return "add"
        return "other"

    def source(node):
        while kind(node) == "identity":
            node = node.args[0]
        return node

    def readers(node):
        """Users of ``node``, looking through identities."""
        out = []
        for u in node.users:
            out.extend(readers(u) if kind(u) == "identity" else [u])
        return out

    parent: dict = {}

    def find(n):
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    for node in graph.nodes:
        if kind(node) == "add":
            for a in node.args:
                parent[find(source(a))] = find(node)
    groups: dict = {}
    for node in graph.nodes:
        k = kind(node)
        if k == "add" or node in parent:
            groups.setdefault(find(node), []).append(node)
        elif k == "layer" and readers(node) and all(kind(u) == "layer" for u in readers(node)):
            groups.setdefault(node, []).append(node)  # a projection read by convs alone
    streams, skipped = [], {}
    for members in groups.values():
        producers = [n.target for n in members if kind(n) == "layer"]
        label = producers[0] if producers else members[0].name
        why = None
        if any(kind(n) not in {"layer", "add"} for n in members):
            why = "a tensor of the stream is not a layer output or a sum of stream tensors"
        readers_ = []
        for n in members:
            for u in readers(n):
                if u in members:
                    continue
                if kind(u) != "layer" or source(u.args[0]) is not n:
                    why = why or f"{u.name} reads the stream and is not a quantized layer"
                else:
                    readers_.append(u.target)
        if why is None and not readers_:
            why = "nothing reads it"
        if why is None and any(getattr(mods[p], "weight", None) is None for p in producers):
            why = "a producer has no weight to scale"
        if why:
            if producers:
                skipped[label] = why
            continue
        streams.append(Stream(producers, list(dict.fromkeys(readers_))))
    return streams, skipped


def asymmetric_pot_error(values: torch.Tensor, factors: torch.Tensor, qmin: int,
                         qmax: int) -> torch.Tensor:
    """Relative squared error ([F]) of quantizing ``values * f`` ([n]) on an asymmetric
    power-of-two grid, at the best exponent (``EXPONENT_TRIES`` at and below the one that spans
    the whole range) and zero-point per factor. At a clipping exponent the best zero-point is
    far from the one anchored at the minimum, so up to 16 codes every zero-point is tried; on
    wider grids those within ``ZP_SHIFTS`` of the anchor."""
    v = values.float()[None, :] * factors[:, None]  # [F, n]
    lo, hi = v.amin(dim=1).clamp(max=0), v.amax(dim=1).clamp(min=0)
    top = round_exponent(torch.log2(((hi - lo) / (qmax - qmin)).clamp_min(1e-30)), "ceil")
    every_code = qmax - qmin < 16

    def error_of(k: torch.Tensor) -> torch.Tensor:
        """The least error at exponent ``k`` over the zero-points tried."""
        s = torch.exp2(k)[:, None]
        anchor = torch.clamp(torch.round(qmin - lo[:, None] / s), qmin, qmax)
        codes = torch.round(v / s)
        shifts = range(qmin, qmax + 1) if every_code else ZP_SHIFTS
        least = torch.full_like(k, float("inf"))
        for j in shifts:
            z = torch.full_like(anchor, float(j)) if every_code else torch.clamp(
                anchor + j, qmin, qmax)
            q = (torch.clamp(codes + z, qmin, qmax) - z) * s
            least = torch.minimum(least, (q - v).pow(2).mean(dim=1))
        return least

    best = choose_exponent(top, [-d for d in range(EXPONENT_TRIES)], error_of)[1]
    energy = values.float().pow(2).mean().clamp_min(1e-30)
    return best / (energy * factors.pow(2))


def _objective(qmodel: nn.Module, s: Stream, acts: dict[str, torch.Tensor],
               factors: torch.Tensor) -> torch.Tensor:
    """Summed relative error of the readers' quantized inputs per factor ([F]). Weights are
    left out: the factor moves every output channel of a producer (and every input channel of
    a reader) alike, so it cannot fit per-channel weight grids, which the exponent search of
    the reconstruction fits channel by channel anyway."""
    total = torch.zeros_like(factors)
    for r in s.readers:
        q = getattr(qmodel.get_submodule(r), "input_quant", None)
        if q is not None and r in acts:
            total += asymmetric_pot_error(acts[r].reshape(-1), factors, *q.qrange)
    return total


@torch.no_grad()
def _scale(qmodel: nn.Module, s: Stream, a: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Scale the stream by ``a``; returns (tensor, copy before) pairs to undo it exactly."""
    saved = []
    for name, f in [(p, a) for p in s.producers] + [(r, 1.0 / a) for r in s.readers]:
        layer = qmodel.get_submodule(name)
        params = [layer.weight] + ([layer.bias] if name in s.producers and layer.bias is not None
                                   else [])
        for t in params:
            saved.append((t, t.clone()))
            t.mul_(f)
    return saved


@torch.no_grad()
def rescale_streams(
    qmodel: nn.Module,
    x: torch.Tensor,
    *,
    grid: int = 32,
    rows: int = 512,
    sample_images: int = 32,
    chunk: int = 64,
    bn_targets: dict | None = None,
) -> RescaleReport:
    """Rescale every linear stream of a prepared power-of-two model in place (entries keyed
    ``stream:<first producer>`` in the report); the readers' inputs are sampled at ``rows``
    positions (all channels) of the first ``sample_images`` images. The float output is checked after each stream
    and a stream that changed it is undone and reported. ``bn_targets`` of producers follow.
    Re-calibrate the quantizers afterwards: their ranges were observed before."""
    if grid < 1:
        raise ConfigError(f"rescale grid must be >= 1, got {grid}")
    report = RescaleReport()
    streams, skipped = find_streams(qmodel)
    report.skipped.update({f"stream:{k}": v for k, v in skipped.items()})
    if not streams:
        return report
    readers = list(dict.fromkeys(r for s in streams for r in s.readers))
    acts = _act_samples(qmodel, x[:sample_images], readers, rows, chunk)
    factors = torch.exp2(torch.arange(grid, device=x.device, dtype=torch.float32) / grid)
    qmodel.eval()
    with float_mode(qmodel):
        ref = qmodel(x[:2])
    tol = 1e-4 * (float(ref.abs().max()) or 1.0)
    for s in streams:
        total = _objective(qmodel, s, acts, factors)
        best = int(total.argmin())
        a = float(factors[best])
        key = f"stream:{s.producers[0]}"
        saved = _scale(qmodel, s, a)
        with float_mode(qmodel):
            out = qmodel(x[:2])
        if not torch.allclose(out, ref, rtol=1e-4, atol=tol):
            for t, before in saved:
                t.copy_(before)
            report.skipped[key] = ("rescaling changed the float model's output (the stream is "
                                   "used where the trace does not show it); left as it was")
            continue
        for p in s.producers:
            if bn_targets and p in bn_targets:
                t = bn_targets[p]
                t.mean.mul_(a)
                t.std.mul_(a)
        report.rescaled[key] = {
            "producers": s.producers, "readers": s.readers, "factors": "one",
            "error_before": float(total[0]), "error_after": float(total[best]),
            "factor_min": a, "factor_max": a,
        }
    return report


__all__ = ["Stream", "asymmetric_pot_error", "find_streams", "rescale_streams"]
