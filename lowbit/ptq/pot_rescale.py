"""Power-of-two-aware rescaling between layers, before RAPQ's scale search.

A power-of-two scale can sit up to a factor sqrt(2) from the best float scale, and at 4 bits
that wastes or clips much of a tensor's range; a depthwise conv, with nine weights per channel,
suffers most (on MobileNetV2 it is most of the PoT-vs-float error of the first inverted
residual).

The pattern ``conv -> [BN, folded] -> ReLU/ReLU6 -> [zero pad] -> conv`` is positively
homogeneous: dividing the producer's output channel ``c`` (weights and bias) by ``f_c > 0`` and
multiplying the consumer's input channel ``c`` by ``f_c`` leaves the float network unchanged,
ReLU6's clip becoming ``6 / f_c`` (:class:`~lowbit.nn.ChannelClamp`). In the original units
this slides the power-of-two grids continuously: the producer's weights and the activation
between by ``f_c``, the consumer's weights by ``1 / f_c``. The factor is chosen over one octave
to minimise the sum of the relative squared quantization errors of those three tensors, each
at its best exponent:

* one factor per channel where the consumer is depthwise and its input has one scale per
  channel (``dw_act_per_channel``);
* one factor for the whole pair otherwise (a per-tensor activation scale must see every
  channel scaled alike).

The factors are folded into weights and a clamp bound, never applied at run time, so the
integer model stays shift-only. Pairs are rescaled from the output backwards, so a conv that
is consumer of one pair and producer of the next is fitted last by the pair before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..graph import Chain, trace_graph
from ..nn.layers import ChannelClamp
from ..nn.transforms import CHANNEL_CLAMP, record, set_submodule
from ..prepare import float_mode
from ..quant.pot import choose_exponent, round_exponent

MODES = ("depthwise",)
EXPONENT_TRIES = 5  # exponents tried below the one that covers the largest value, inclusive
CHANNEL_CHUNK = 64  # rows evaluated at once (bounds the [rows, factors, samples] tensor)


@dataclass
class RescaleReport:
    """What :func:`rescale_pairs` did, per consumer layer."""

    rescaled: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"rescaled {len(self.rescaled)} layer pairs, skipped {len(self.skipped)}"]
        lines += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


def find_chains(qmodel: nn.Module) -> tuple[list[Chain], dict[str, str]]:
    """The ``conv -> ReLU/ReLU6 -> depthwise conv`` chains of the model's graph in execution
    order, and why other depthwise convs do not qualify."""
    return trace_graph(qmodel).chains(depthwise_only=True)


def relative_pot_error(values: torch.Tensor, factors: torch.Tensor, qmin: int,
                       qmax: int) -> torch.Tensor:
    """Relative squared error, per row and factor ([R, F]), of quantizing ``values * f``
    ([R, n]) on a power-of-two grid, at the best of the exponents at and below the one that
    covers the row's largest magnitude. Zero-points are 0 (symmetric weights, ReLU outputs).
    Relative error is scale-free, so it compares factors directly."""
    out = []
    for v in values.float().split(CHANNEL_CHUNK):
        energy = v.pow(2).mean(dim=1, keepdim=True)
        vf = v[:, None, :] * factors[None, :, None]
        reach = vf.abs().amax(dim=2).clamp_min(1e-30)
        top = round_exponent(torch.log2(reach / max(abs(qmin), qmax, 1)), "ceil")

        def error_of(k: torch.Tensor, vf=vf) -> torch.Tensor:
            s = torch.exp2(k)[:, :, None]
            q = torch.clamp(torch.round(vf / s), qmin, qmax) * s
            return (q - vf).pow(2).mean(dim=2)

        best = choose_exponent(top, [-d for d in range(EXPONENT_TRIES)], error_of)[1]
        rel = best / (energy * factors[None, :].pow(2)).clamp_min(1e-30)
        out.append(torch.where(energy > 0, rel, torch.zeros_like(rel)))
    return torch.cat(out)


def _weight_term(layer: nn.Module, factors: torch.Tensor, rows: bool) -> torch.Tensor | None:
    """Relative error of ``layer``'s weights scaled by each factor: per output channel
    ([C, F], ``rows``) or averaged over them ([1, F])."""
    q = getattr(layer, "weight_quant", None)
    if q is None:
        return None
    w = layer.weight.detach()
    w = w.reshape(w.shape[0], -1) if q.per_channel else w.reshape(1, -1)
    err = relative_pot_error(w, factors, *q.qrange)
    return err if rows else err.mean(dim=0, keepdim=True)


@torch.no_grad()
def _act_samples(qmodel: nn.Module, x: torch.Tensor, names: list[str], per_channel: int,
                 chunk: int) -> dict[str, torch.Tensor]:
    """Evenly strided float-model input values of the layers ``names``, [C, per_channel]."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    per_chunk = max(1, per_channel * chunk // max(1, x.shape[0]))

    def grab(inputs, name):
        # [N*H*W, C]: a view for channels_last inputs, so only the sampled rows are copied
        rows = inputs[0].detach().movedim(1, -1).reshape(-1, inputs[0].shape[1])
        got[name].append(rows[:: max(1, rows.shape[0] // per_chunk)].T.float())

    handles = [qmodel.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: grab(i, n)) for n in names]
    qmodel.eval()
    try:
        with float_mode(qmodel):
            for i in range(0, x.shape[0], chunk):
                qmodel(x[i:i + chunk])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v, dim=1) for n, v in got.items()}


@torch.no_grad()
def _apply(qmodel: nn.Module, chain: Chain, f: torch.Tensor) -> None:
    """Divide the producer's output channels by ``f`` ([C]) and multiply the consumer's input
    channels by it; the activation between gets its clip divided."""
    prod, cons = qmodel.get_submodule(chain.producer), qmodel.get_submodule(chain.consumer)
    prod.weight.div_(f.reshape([-1] + [1] * (prod.weight.dim() - 1)))
    if prod.bias is not None:
        prod.bias.div_(f)
    cons.weight.mul_(f.reshape([-1] + [1] * (cons.weight.dim() - 1)))  # depthwise: rows
    act = qmodel.get_submodule(chain.act)
    if isinstance(act, ChannelClamp):
        act.upper.div_(f)
    elif isinstance(act, nn.Hardtanh):
        set_submodule(qmodel, chain.act, ChannelClamp(torch.full_like(f, float(act.max_val)) / f))


def _choose(qmodel: nn.Module, c: Chain, acts: torch.Tensor,
            factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Summed relative error of the three tensors per candidate ([R, F]), and whether the
    factors are per channel (R = C) or one for the pair (R = 1)."""
    prod, cons = qmodel.get_submodule(c.producer), qmodel.get_submodule(c.consumer)
    aq = cons.input_quant
    per_channel = all(
        q is None or q.per_channel
        for q in (aq, getattr(prod, "weight_quant", None), cons.weight_quant))
    inv = 1.0 / factors
    terms = [relative_pot_error(acts if per_channel else acts.reshape(1, -1), inv, *aq.qrange)
             if aq is not None else None,
             _weight_term(cons, factors, rows=per_channel),
             _weight_term(prod, inv, rows=per_channel)]
    return sum(t for t in terms if t is not None), per_channel


@torch.no_grad()
def rescale_pairs(
    qmodel: nn.Module,
    x: torch.Tensor,
    *,
    grid: int = 32,
    samples_per_channel: int = 1024,
    sample_images: int = 128,
    chunk: int = 64,
    bn_targets: dict | None = None,
    progress: bool = False,
) -> RescaleReport:
    """Rescale every ``conv -> ReLU/ReLU6 -> depthwise conv`` pair of a prepared power-of-two
    model in place.

    ``x`` is the calibration tensor (the first ``sample_images`` give the activation samples).
    Only pairs into depthwise convs are rescaled: their per-channel weights take one factor per
    channel exactly, while a factor into an ordinary conv must be shared by its whole input
    (docs/notes/rapq.md). The float model's output is checked to be unchanged after each pair, and a pair that changes it (a
    tensor of it is used by something hooks cannot see) is undone and reported. ``bn_targets``
    (from :func:`lowbit.ptq.reconstruct.bn_targets`) are rescaled to match. Re-calibrate the
    quantizers afterwards: their ranges were observed before.
    """
    if grid < 1:
        raise ConfigError(f"rescale grid must be >= 1, got {grid}")
    report = RescaleReport()
    chains, report.skipped = find_chains(qmodel)
    if not chains:
        return report
    acts = _act_samples(qmodel, x[:sample_images], [c.consumer for c in chains],
                        samples_per_channel, chunk)
    factors = torch.exp2(torch.arange(grid, device=x.device, dtype=torch.float32) / grid)
    qmodel.eval()
    with float_mode(qmodel):
        ref = qmodel(x[:2])
    scale = float(ref.abs().max()) or 1.0
    from tqdm.auto import tqdm

    for c in tqdm(list(reversed(chains)), desc="rescale pairs", disable=not progress,
                  leave=False):
        prod, cons = qmodel.get_submodule(c.producer), qmodel.get_submodule(c.consumer)
        total, per_channel = _choose(qmodel, c, acts.pop(c.consumer), factors)
        best = total.argmin(dim=1)
        f = factors[best].expand(prod.out_channels).contiguous()
        act = qmodel.get_submodule(c.act)
        saved = [t.clone() for t in (prod.weight, cons.weight)]
        bias = prod.bias.clone() if prod.bias is not None else None
        upper = act.upper.clone() if isinstance(act, ChannelClamp) else None
        _apply(qmodel, c, f)
        with float_mode(qmodel):
            out = qmodel(x[:2])
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * scale):
            prod.weight.copy_(saved[0])
            cons.weight.copy_(saved[1])
            if bias is not None:
                prod.bias.copy_(bias)
            if upper is not None:
                act.upper.copy_(upper)
            set_submodule(qmodel, c.act, act)
            report.skipped[c.consumer] = ("rescaling changed the float model's output (a tensor "
                                          "of the pair is used outside modules); left as it was")
            continue
        if not isinstance(act, ChannelClamp):
            record(qmodel, CHANNEL_CLAMP, c.act)  # the ReLU6 is a ChannelClamp from now on
        if bn_targets and c.producer in bn_targets:
            t = bn_targets[c.producer]
            t.mean.div_(f.to(t.mean.device))
            t.std.div_(f.to(t.std.device))
        report.rescaled[c.consumer] = {
            "producer": c.producer, "act": c.act,
            "factors": "per-channel" if per_channel else "one",
            "error_before": float(total[:, 0].mean()),
            "error_after": float(total.gather(1, best[:, None]).mean()),
            "factor_min": float(f.min()), "factor_max": float(f.max()),
        }
    return report


__all__ = ["MODES", "Chain", "RescaleReport", "find_chains", "relative_pot_error",
           "rescale_pairs"]
