"""Block reconstruction with learned weight rounding and learned scales (BRECQ / RAPQ style).

Shared by RAPQ (power-of-two scales) and the float-scale ``brecq`` comparison: the only
difference is whether a learned log2 scale is rounded (straight-through) to an integer.

During optimisation each quantizer of the unit is temporarily wrapped by
:class:`TrainableQuant`, which owns the relaxed parameters (a log2 scale, AdaRound's soft
rounding variables) and writes integer results back into the quantizer when done; the
quantizers themselves never hold a non-integer exponent or zero-point.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..memory import reusing_freed_memory
from ..nn.layers import QuantLayerMixin
from ..prepare import find_conv_bn_pairs, quant_layers, set_mode
from ..quant.autograd import fixed_fake_quant, floor_ste
from ..quant.base import Quantizer
from ..quant.pot import round_exponent, zero_point_for
from .blocks import find_units, run_chunked, trace_units, walk_units
from .exponent_search import search_unit_exponents

log = logging.getLogger("lowbit")

N_EVAL = 256  # calibration images on which a unit's (and a step's) error is judged
# AdaRound's rectified sigmoid stretch (Nagel et al. 2020).
ZETA, GAMMA = 1.1, -0.1


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_rect_sigmoid(h: torch.Tensor) -> torch.Tensor:
    h = h.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


class TrainableQuant(nn.Module):
    """A quantizer's relaxed twin: learned log2 scale and, for weights, AdaRound rounding.

    ``pot``: the log2 scale is rounded with a straight-through estimator in ``ste`` relaxation
    (the forward pass then uses the exact exponent that will be exported) or used as is in
    ``continuous`` relaxation. Zero-points are recomputed from the quantizer's lower clipping
    bound at every step and rounded, so they are integers throughout.
    """

    def __init__(
        self,
        inner: Quantizer,
        *,
        pot: bool,
        learn_scale: bool,
        weight: torch.Tensor | None = None,
        relax: str = "ste",
    ):
        super().__init__()
        inner.require_calibrated()
        self.inner = inner
        self.pot = pot
        self.relax = relax
        self.qmin, self.qmax = inner.qrange
        s0, zp0 = inner.scale_zero_point()
        t0 = torch.log2(s0.detach().float())
        self.log2_scale = nn.Parameter(t0.clone(), requires_grad=learn_scale)
        self.register_buffer("t0", t0.clone())
        self.register_buffer("zp0", zp0.detach().float().clone())
        self.asymmetric = not inner.symmetric
        lo = inner.params().get("clip_lo")
        self.register_buffer("lo", (lo if lo is not None else (self.qmin - zp0) * s0).float())
        self.soft = True
        self.v: nn.Parameter | None = None
        if weight is not None:
            rest = weight.detach() / self._b(s0, weight)
            self.v = nn.Parameter(_inverse_rect_sigmoid(rest - torch.floor(rest)))

    def _b(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.inner.broadcast(t, x)

    def scale(self) -> torch.Tensor:
        t = self.log2_scale
        if self.pot and self.relax == "ste":
            t = round_exponent(t, ste=True)
        return torch.exp2(t)

    def zero_point(self, scale: torch.Tensor) -> torch.Tensor:
        if not self.asymmetric:
            return self.zp0
        return zero_point_for(self.lo, scale.detach(), self.qmin, self.qmax)

    def rounding(self) -> torch.Tensor:
        """AdaRound's rounding offsets in [0, 1]: soft while learning, hard 0/1 after."""
        return _rect_sigmoid(self.v) if self.soft else (self.v >= 0).to(self.v.dtype)

    def round_penalty(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser: zero only when every offset is exactly 0 or 1."""
        return (1 - (2 * _rect_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale()
        zp = self.zero_point(s)
        if self.v is None:
            # torch's fused kernels give the same values and straight-through gradients (LSQ's
            # for the scale) as the AdaRound formula below with round in place of floor + h,
            # but save only their inputs for backward: a fraction of the memory on large maps.
            if not self.log2_scale.requires_grad:
                # A fixed scale (power-of-two activations in reconstruction): no scale or
                # zero-point gradient to reduce, and the quantizers' own fixed-scale passes
                # give torch's fake-quantize values and input gradient in less time on a CPU
                # (docs/notes/rapq.md).
                sb = self._b(s, x)
                return fixed_fake_quant(x, 1.0 / sb, sb, self._b(torch.round(zp), x),
                                        self.qmin, self.qmax)
            if s.numel() == 1 and (self.qmin >= 0 or not self.asymmetric):
                return torch._fake_quantize_learnable_per_tensor_affine(
                    x, s.reshape(1), zp.reshape(1), self.qmin, self.qmax, 1.0)
            if s.numel() == 1:
                # The per-tensor kernel's backward truncates a negative zero-point towards zero
                # (torch 2.13: input and scale gradients one code off on signed asymmetric
                # inputs); the per-channel kernel along the batch axis, one scale repeated,
                # computes the same values with the right gradients.
                n = x.shape[0]
                return torch._fake_quantize_learnable_per_channel_affine(
                    x, s.reshape(1).expand(n).contiguous(), zp.reshape(1).expand(n).contiguous(),
                    0, self.qmin, self.qmax, 1.0)
            return torch._fake_quantize_learnable_per_channel_affine(
                x, s, zp, self.inner.ch_axis % x.dim(), self.qmin, self.qmax, 1.0)
        sb, zpb = self._b(s, x), self._b(zp, x)
        q = floor_ste(x / sb) + self.rounding()
        return (torch.clamp(q + zpb, self.qmin, self.qmax) - zpb) * sb

    @torch.no_grad()
    def reset(self) -> None:
        self.log2_scale.copy_(self.t0)

    @torch.no_grad()
    def commit(self, weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """Write the integer result into the quantizer; return the hard-rounded weight."""
        self.soft = False
        out = self(weight) if weight is not None and self.v is not None else None
        if self.pot:
            if not self.inner.power_of_two:
                raise ConfigError("power-of-two relaxation needs a 'pot' quantizer")
            self.inner.load_params({"exponent": round_exponent(self.log2_scale)})
        else:
            s = torch.exp2(self.log2_scale)
            self.inner.load_params({"scale": s, "zero_point": self.zero_point(s)})
        return out


def wrap_quantizers(
    module: nn.Module, *, pot: bool, learn_w_scale: bool, learn_a_scale: bool,
    adaround: bool, relax: str = "ste",
) -> list[tuple[QuantLayerMixin, str, TrainableQuant]]:
    """Swap every quantizer of ``module`` for a :class:`TrainableQuant`; returns the swaps."""
    swaps = []
    for _, layer in quant_layers(module):
        if layer.weight_quant is not None:
            tq = TrainableQuant(layer.weight_quant, pot=pot, learn_scale=learn_w_scale,
                                weight=layer.weight if adaround else None, relax=relax)
            swaps.append((layer, "weight_quant", tq))
        if layer.input_quant is not None:
            tq = TrainableQuant(layer.input_quant, pot=pot, learn_scale=learn_a_scale, relax=relax)
            swaps.append((layer, "input_quant", tq))
    for layer, slot, tq in swaps:
        setattr(layer, slot, tq.to(layer.weight.device))
    return swaps


def unwrap_quantizers(swaps, commit: bool = True) -> None:
    """Commit (integer exponents, hard rounding written into the weights) and restore."""
    for layer, slot, tq in swaps:
        if commit:
            w = tq.commit(layer.weight if slot == "weight_quant" else None)
            if w is not None:
                layer.weight.data.copy_(w)
        setattr(layer, slot, tq.inner)


@dataclass
class BNTarget:
    """Statistics a pre-activation should have: the BN's affine output mean and std."""

    mean: torch.Tensor
    std: torch.Tensor


def bn_targets(model: nn.Module, example_inputs, folded: bool = True):
    """Per-layer BN targets from the float model, and the BNs skipped for lack of statistics.

    With BN folded into the conv (the default), the folded conv's output should have
    per-channel mean ``beta`` and std ``|gamma| * sqrt(var / (var + eps))``. A BN whose running
    mean is all 0 and variance all 1 (folded upstream, as TFLite exports are) carries no
    information and is skipped. Keys are the names of the modules whose output is matched.
    """
    targets: dict[str, BNTarget] = {}
    skipped: list[str] = []
    for conv_name, bn_name in find_conv_bn_pairs(model, example_inputs):
        bn = model.get_submodule(bn_name)
        mean, var = bn.running_mean, bn.running_var
        if mean is None or var is None or (
            bool((mean == 0).all()) and bool((var == 1).all())
        ):
            skipped.append(bn_name)
            continue
        gamma = bn.weight.detach() if bn.affine else torch.ones_like(var)
        beta = bn.bias.detach() if bn.affine else torch.zeros_like(mean)
        std = gamma.abs() * torch.sqrt(var / (var + bn.eps))
        targets[conv_name if folded else bn_name] = BNTarget(beta.clone(), std.clone())
    return targets, skipped


DIVERSIFY = ("auto", "on", "off")
ROUND_TRAVEL = 30.0  # lr_round * iters of the default: 0.1 at 300 steps, 0.03 at 1,000


def default_lr_round(iters: int) -> float:
    """The rounding learning rate for ``iters`` steps: ``ROUND_TRAVEL / iters``, at most 0.1.

    A logit must travel past about +-2.4 for its offset to settle, and Adam moves it by about
    the learning rate per step; the measurements are in docs/notes/rapq.md.
    """
    return min(0.1, ROUND_TRAVEL / max(1, iters))


@dataclass
class ReconOptions:
    """Knobs of block reconstruction (defaults follow BRECQ/AdaRound, scaled to CPU budgets).

    ``iters``: optimisation steps per unit; 0 runs each unit's exponent search alone (power
    of two only), no learned rounding.

    ``lr_round``: Adam's learning rate of AdaRound's rounding logits; ``None`` gives
    :func:`default_lr_round` for ``iters``. Adam moves a logit by about this much per step,
    and an offset is decided (0 or 1) only once its logit passes about +-2.4, so
    ``lr_round * iters`` must be well above that: BRECQ's 1e-3 suits its 20,000 steps, not the
    hundreds a CPU affords (docs/rapq.md, "Design rationale").

    ``learn_a_scale``: learn activation scales by gradient; ``None`` does for float scales and
    not for power-of-two ones, whose straight-through exponent jumps by a factor of two only
    after the gradient has pointed one way for many steps. ``exponent_search``: with
    power-of-two scales, first pick every exponent of the unit among its neighbours by the
    layers' output errors (:mod:`lowbit.ptq.exponent_search`); no effect on float scales.

    ``diversify``: before reconstruction, replace ``diversify_share`` of the calibration images
    by copies pushed in ``diversify_steps`` input-gradient steps toward random classes of the
    float model (:mod:`lowbit.ptq.synthetic`): ``"auto"`` when the calibration images cover few
    of the model's classes (the :class:`~lowbit.errors.NarrowCalibrationWarning` condition),
    ``"on"`` always (classifiers), ``"off"`` never. Without it the rounding is fitted to the
    few classes' features (docs/calibration.md).
    """

    iters: int = 1000
    batch_size: int = 32
    lr_round: float | None = None
    lr_scale: float = 2e-3
    round_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    bn_weight: float = 0.05
    learn_w_scale: bool = False
    learn_a_scale: bool | None = None
    exponent_search: bool = True
    diversify: str = "auto"
    diversify_share: float = 0.5
    diversify_steps: int = 40
    chunk: int = 64
    block_types: tuple[type[nn.Module], ...] | None = None
    seed: int = 0
    progress: bool = True

    def resolved_lr_round(self) -> float:
        return self.lr_round if self.lr_round is not None else default_lr_round(self.iters)

    def check(self, pot: bool = True) -> None:
        if self.iters < 0 or self.batch_size < 1:
            raise ConfigError(
                f"reconstruction needs iters >= 0 and batch_size >= 1, got iters={self.iters}, "
                f"batch_size={self.batch_size}"
            )
        if self.lr_round is not None and not 0 < self.lr_round < float("inf"):
            raise ConfigError(f"lr_round must be a positive learning rate, got {self.lr_round}")
        if self.diversify not in DIVERSIFY:
            raise ConfigError(
                f"diversify must be one of {DIVERSIFY}, got {self.diversify!r}")
        if not 0 <= self.diversify_share <= 1 or self.diversify_steps < 0:
            raise ConfigError(
                "diversify needs 0 <= diversify_share <= 1 and diversify_steps >= 0, got "
                f"{self.diversify_share} and {self.diversify_steps}")
        if self.iters == 0 and not (pot and self.exponent_search):
            raise ConfigError(
                "iters=0 runs the exponent search alone, which needs power-of-two scales and "
                "exponent_search=True; give iters >= 1 to reconstruct"
            )


@dataclass
class UnitReport:
    name: str
    error_before: float
    error_after: float
    bn_layers: int
    seconds: float
    reverted: bool = False  # the reconstruction was discarded (see ``kept``)
    exponents_changed: int = 0  # by the exponent search (power of two)
    kept: str = "reconstruction"  # or "search" (searched exponents, nearest rounding) or "start"
    candidates: dict[str, float] = field(default_factory=dict)  # the error of each of the three
    recon_from: str | None = None  # "search" or "start": the exponents the rounding was learned on


@dataclass
class ReconReport:
    units: list[UnitReport] = field(default_factory=list)
    seconds_cache: float = 0.0
    seconds_optimise: float = 0.0


def output_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels, mean over the rest."""
    d = (out - target).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


@torch.no_grad()
def _eval_error(unit: nn.Module, args: tuple, target: torch.Tensor, chunk: int):
    n = target.shape[0]
    m = min(n, N_EVAL)
    sub = tuple(a[:m] if isinstance(a, torch.Tensor) and a.shape[:1] == (n,) else a for a in args)
    out = run_chunked(unit, sub, {}, m, chunk)
    return output_error(out, target[:m]).item()


def reconstruct_unit(
    unit: nn.Module,
    q_args: tuple,
    target: torch.Tensor,
    opts: ReconOptions,
    *,
    pot: bool,
    bn: dict[nn.Module, BNTarget] | None = None,
    name: str = "",
) -> UnitReport:
    """Learn the rounding of ``unit``'s weights and its scales so that, fed the quantized
    inputs ``q_args``, it reproduces the float outputs ``target`` (plus the BN term)."""
    t_start = time.perf_counter()
    bn = bn or {}
    # The unit ends in whichever has the least error: its start, the searched exponents
    # (nearest rounding) or the reconstruction. A short reconstruction can end above a search
    # that helped; the unit then keeps the search alone. The reconstruction itself starts from
    # the better of the first two.
    kept: dict[str, tuple[float, dict]] = {}
    err_before = _eval_error(unit, q_args, target, opts.chunk)
    kept["start"] = (err_before, copy.deepcopy(unit.state_dict()))
    moved = 0
    recon_from = "start"
    if pot and opts.exponent_search:
        moved = sum(search_unit_exponents(unit, q_args, chunk=opts.chunk).values())
        if moved:
            kept["search"] = (_eval_error(unit, q_args, target, opts.chunk),
                              copy.deepcopy(unit.state_dict()))
            # The search judges each layer on its own output; when that raised the unit's
            # error, the rounding is learned from the start's exponents instead.
            if kept["search"][0] <= err_before:
                recon_from = "search"
            else:
                unit.load_state_dict(kept["start"][1])
    err_recon = None
    if opts.iters > 0:  # iters=0: the exponent search alone, no learned rounding
        _optimise_unit(unit, q_args, target, opts, pot=pot, bn=bn, name=name)
        err_recon = _eval_error(unit, q_args, target, opts.chunk)
    best = min(kept, key=lambda k: kept[k][0])
    if err_recon is not None and err_recon <= kept[best][0]:
        best, err_after = "reconstruction", err_recon
    else:
        err_after, state = kept[best]
        unit.load_state_dict(state)
    candidates = {k: v[0] for k, v in kept.items()}
    if err_recon is not None:
        candidates["reconstruction"] = err_recon
    changed = moved if best == "search" or (best == "reconstruction"
                                            and recon_from == "search") else 0
    return UnitReport(name, err_before, err_after, len(bn), time.perf_counter() - t_start,
                      best != "reconstruction", exponents_changed=changed,
                      kept=best, candidates=candidates,
                      recon_from=recon_from if err_recon is not None else None)


def _optimise_unit(unit: nn.Module, q_args: tuple, target: torch.Tensor, opts: ReconOptions,
                   *, pot: bool, bn: dict[nn.Module, BNTarget], name: str) -> None:
    """AdaRound's rounding (and learned scales) for ``opts.iters`` steps, committed in place."""
    n = target.shape[0]
    learn_a = opts.learn_a_scale if opts.learn_a_scale is not None else not pot
    swaps = wrap_quantizers(unit, pot=pot, learn_w_scale=opts.learn_w_scale,
                            learn_a_scale=learn_a, adaround=True)
    frozen = [p for p in unit.parameters() if p.requires_grad and not _owned(p, swaps)]
    for p in frozen:
        p.requires_grad_(False)
    round_params = [tq.v for _, _, tq in swaps if tq.v is not None]
    scale_params = [tq.log2_scale for _, _, tq in swaps if tq.log2_scale.requires_grad]
    groups = [{"params": round_params, "lr": opts.resolved_lr_round()}]
    if scale_params:
        groups.append({"params": scale_params, "lr": opts.lr_scale})
    opt = torch.optim.Adam(groups)
    stats: list[torch.Tensor] = []

    def bn_hook(mod, inputs, out):
        stats.append(bn_statistics_error(out, bn[mod]))

    handles = [m.register_forward_hook(bn_hook) for m in bn] if opts.bn_weight > 0 else []
    gen = torch.Generator().manual_seed(opts.seed)
    bs = min(opts.batch_size, n)
    warm = int(opts.warmup * opts.iters)
    b0, b1 = opts.beta
    from tqdm.auto import tqdm

    bar = tqdm(range(opts.iters), desc=f"reconstruct {name}", disable=not opts.progress,
               leave=False)
    try:
        for it in bar:
            idx = torch.randint(0, n, (bs,), generator=gen)
            args = tuple(a[idx] if isinstance(a, torch.Tensor) and a.shape[:1] == (n,) else a
                         for a in q_args)
            stats.clear()
            loss = output_error(unit(*args), target[idx])
            if stats:
                loss = loss + opts.bn_weight * torch.stack(stats).sum()
            if it >= warm:
                beta = b1 + (b0 - b1) * (1 - (it - warm) / max(1, opts.iters - warm))
                loss = loss + opts.round_weight * sum(
                    tq.round_penalty(beta) for _, _, tq in swaps if tq.v is not None
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if opts.progress and (it + 1) % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.4g}")
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        bar.close()
    unwrap_quantizers(swaps, commit=True)


def _owned(p: nn.Parameter, swaps) -> bool:
    return any(p is tq.log2_scale or p is tq.v for _, _, tq in swaps)


@reusing_freed_memory
def reconstruct(
    qmodel: nn.Module,
    inputs: torch.Tensor,
    opts: ReconOptions,
    *,
    pot: bool,
    bn: dict[str, BNTarget] | None = None,
) -> ReconReport:
    """Reconstruct every unit of a calibrated ``qmodel`` in execution order, in place.

    The float reference is the prepared model itself in float mode (BN already folded), copied
    once; inputs of each unit are propagated through the traced graph, never recomputed.
    """
    opts.check(pot)
    units = find_units(qmodel, opts.block_types)
    if not units:
        raise ConfigError("model has no quantized layers to reconstruct: prepare it first")
    graph = trace_units(qmodel, units)
    fp_model = set_mode(copy.deepcopy(qmodel), "float").eval()
    qmodel.eval()
    bn = bn or {}
    report = ReconReport()
    t0 = time.perf_counter()

    def on_unit(name, q_args, fp_out):
        unit = qmodel.get_submodule(name)
        prefix = name + "."
        unit_bn = {}
        for mod_name, mod in unit.named_modules():
            full = name if not mod_name else prefix + mod_name
            if full in bn:
                tgt = bn[full]
                dev = fp_out.device
                unit_bn[mod] = BNTarget(tgt.mean.to(dev), tgt.std.to(dev))
        report.units.append(
            reconstruct_unit(unit, q_args, fp_out, opts, pot=pot, bn=unit_bn, name=name)
        )
        log.info("reconstructed unit %d/%d %s (%.1f s)", len(report.units), len(units), name,
                 report.units[-1].seconds)

    walk_units(graph, units, fp_model, qmodel, inputs, on_unit, chunk=opts.chunk)
    total = time.perf_counter() - t0
    report.seconds_optimise = sum(u.seconds for u in report.units)
    report.seconds_cache = total - report.seconds_optimise
    return report


def bn_statistics_error(out: torch.Tensor, target) -> torch.Tensor:
    """Squared distance of a layer output's per-channel batch mean and std from the BN
    statistics ``target`` (``.mean``, ``.std``): the term that keeps reconstructed or
    synthesised activations on the float model's distribution."""
    dims = [d for d in range(out.dim()) if d != 1]
    mean = out.mean(dims)
    std = torch.sqrt(out.var(dims, unbiased=False) + 1e-5)
    return ((mean - target.mean) ** 2 + (std - target.std) ** 2).sum()
