"""The integer-only reference: what a quantized model computes when it runs on integers.

It is the ground truth the exported formats are checked against. Tensors are integer codes on
a quantizer's grid (``real = (code - zero_point) * scale``) or int32 accumulators (zero-point
0, one scale per channel). A conv/linear multiplies codes with codes and accumulates in int32,
adds its bias quantized to int32 at ``s_x * s_w``; an accumulator becomes codes again by
requantization: times a dyadic multiplier ``m * 2**-n``, one rounding rule (half to even, as
``torch.round`` and onnxruntime), plus the zero-point, clamped to the code range. The multiplier
is the float32 ``s_acc / s_out`` that onnxruntime computes, decomposed exactly (``m < 2**24``),
so the two agree bit for bit up to its float rounding; on power-of-two grids it is a pure shift
(``m == 1``, checked). Residual adds without a quantization point add int32 accumulators at one
scale (:func:`_add` says which); average pools sum in int32 and fold ``1 / N`` into the next
multiplier. Activation clamps clamp codes, bounds rounded onto the grid (exact, as rounding is
monotone).

Convolutions run on torch's float kernels where a bound on every partial sum, proved from the
code ranges and the fan-in, makes them exact (:mod:`.exact_sums`), else on its int64 kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import CalibrationError, ExportError
from ..graph.ops import (
    COMMUTING,
    Op,
    chain_end,
    describe,
    requant_target,
    resolve,
    trace,
)
from ..quant.base import IntegerForm, Quantizer, int_range
from .exact_sums import FLOAT64_EXACT, INT64_EXACT, SumPlan, exact_sums, plan_sums

INT32_MAX = 2**31 - 1
_ZERO = torch.zeros(1, dtype=torch.int64)  # accumulators have no zero-point
MANTISSA_BITS = 24  # float32 significand: every float32 multiplier is m * 2**-n with m < 2**24


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """The one rounding rule of the integer model (``torch.round`` is half to even)."""
    return torch.round(x)


def dyadic(multiplier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(m, n)`` with ``multiplier == m * 2**-n`` for float32 multipliers, ``m`` odd
    (so a power of two gives ``m == 1``, a pure shift); ``n`` may be negative (left shift)."""
    mult = multiplier.to(torch.float32)
    if not bool((mult > 0).all()) or not bool(torch.isfinite(mult).all()):
        raise ExportError(f"requantization multipliers must be positive and finite, got "
                          f"{mult.flatten()[:4].tolist()}")
    frac, exp = torch.frexp(mult)
    m = (frac.double() * 2**MANTISSA_BITS).to(torch.int64)
    n = (MANTISSA_BITS - exp).to(torch.int64)
    tz = _trailing_zeros(m)
    return m >> tz, n - tz


def _trailing_zeros(m: torch.Tensor) -> torch.Tensor:
    low = m & -m  # lowest set bit
    return torch.log2(low.double()).round().to(torch.int64)


def shift_round(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``round(p * 2**-n)`` half to even, exactly, for int64 ``p`` (``n <= 0``: left shift)."""
    left = n <= 0
    k = torch.where(left, torch.ones_like(n), n)
    floor = torch.bitwise_right_shift(p, k)  # arithmetic: floor for negatives too
    rem = p - torch.bitwise_left_shift(floor, k)
    half = torch.bitwise_left_shift(torch.ones_like(k), k - 1)
    up = (rem > half) | ((rem == half) & (floor % 2 == 1))
    right = floor + up.to(p.dtype)
    return torch.where(left, torch.bitwise_left_shift(p, torch.where(left, -n, 0)), right)


@dataclass
class Grid:
    """A quantizer's grid: scale and zero-point (``[1]`` or one per channel along ``axis``),
    bits and code range."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    qmin: int
    qmax: int
    axis: int | None
    power_of_two: bool
    name: str = ""

    @classmethod
    def of(cls, q: Quantizer) -> Grid:
        if not q.calibrated:
            raise CalibrationError(
                f"{q._where()} was never calibrated, so the model has no integer form; "
                "calibrate it (lowbit.calibrate or lowbit ptq) before exporting"
            )
        if not q.has_integer_form:
            q.integer_form(torch.zeros(1))  # raises the kind's message
        p = q.params()
        signed = bool(q.signed)
        qmin, qmax = q.qrange
        return cls(p["scale"].float().reshape(-1), p["zero_point"].to(torch.int64).reshape(-1),
                   q.bits, signed, qmin, qmax, q.axis, q.power_of_two, q.name)

    def same(self, other: Grid) -> bool:
        return (self.bits == other.bits and (self.qmin, self.qmax) == (other.qmin, other.qmax)
                and torch.equal(self.scale, other.scale)
                and torch.equal(self.zero_point, other.zero_point))


@dataclass
class IntValue:
    """Integer tensor ``data`` (int64) with ``real = (data - zero_point) * scale``; ``grid``
    is None for an int32 accumulator. ``scale``/``zero_point`` are ``[1]`` or per channel
    (dim 1)."""

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    grid: Grid | None = None

    def per_dim1(self, t: torch.Tensor) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        return t.reshape([1, -1] + [1] * (self.data.dim() - 2))

    def centred(self) -> torch.Tensor:
        """``data - zero_point`` (``data`` itself, not a copy, when every zero-point is 0)."""
        if not bool(self.zero_point.any()):
            return self.data
        return self.data - self.per_dim1(self.zero_point)

    def real(self) -> torch.Tensor:
        return (self.centred().double() * self.per_dim1(self.scale).double()).float()


def requantize(v: IntValue, grid: Grid, stats: Stats | None = None) -> IntValue:
    """``v`` on ``grid``: ``clamp(round(M * (v - z)) + z', qmin, qmax)``, ``M = s / s'`` dyadic."""
    dims = v.data.dim()
    m, n = _multiplier(v.scale, grid, dims, stats)
    q = scale_round(v.centred(), m, n, _dim1(grid.zero_point, dims), grid.qmin, grid.qmax)
    return IntValue(q, grid.scale, grid.zero_point, grid)


def _multiplier(scale: torch.Tensor, grid: Grid, dims: int, stats: Stats | None):
    m, n = dyadic(_dim1(scale.float(), dims) / _dim1(grid.scale, dims))
    if stats is not None:
        stats.multipliers.append(m.flatten())
    return m, n


def scale_round(p: torch.Tensor, m: torch.Tensor, n: torch.Tensor, offset=0,
                lo: int | None = None, hi: int | None = None) -> torch.Tensor:
    """``clamp(round(p * m * 2**-n) + offset, lo, hi)`` exactly, half to even, for int64 ``p``
    and dyadic ``(m, n)``: in float64 where ``max|p| * max(m) < 2**53`` (:func:`_round_f64`),
    else in int64 shifts (:func:`shift_round`)."""
    top = _magnitude(p) * int(m.max())
    if top < FLOAT64_EXACT:
        return _round_f64(p.to(torch.float64), m, n, offset, lo, hi)
    if top >= INT64_EXACT:
        raise ExportError(f"a requantization product reaches {top}, beyond int64")
    q = shift_round(p * m, n) + offset
    return q if lo is None else q.clamp(lo, hi)


def _round_f64(t: torch.Tensor, m, n, offset=0, lo=None, hi=None) -> torch.Tensor:
    """:func:`scale_round` on float64 ``t`` holding integers with ``max|t| * max(m) < 2**53``
    (the caller proves it): the product is then exact (``2**-n`` only moves its exponent), and
    so are its rounding, the offset and the clamp. Overwrites ``t``."""
    t = t.mul_(torch.ldexp(m.to(torch.float64), -n)).round_().add_(offset)
    return (t if lo is None else t.clamp_(lo, hi)).to(torch.int64)


def _magnitude(p: torch.Tensor) -> int:
    if not p.numel():
        return 0
    lo, hi = torch.aminmax(p)
    return max(-int(lo), int(hi))


def _dim1(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.reshape(()) if t.numel() == 1 else t.reshape([1, -1] + [1] * (dims - 2))


@dataclass
class Stats:
    """What one run used: every multiplier's ``m`` and the codes at each layer's input."""

    multipliers: list[torch.Tensor] = field(default_factory=list)
    layer_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    float_ops: dict[str, str] = field(default_factory=dict)

    def shifts_only(self) -> bool:
        return all(bool((m == 1).all()) for m in self.multipliers)


@dataclass
class LayerForm:
    """A quantized layer in integers: weight codes and grid, the int32 bias at ``s_x * s_w``."""

    name: str
    module: nn.Module
    input_grid: Grid
    weight_codes: torch.Tensor  # int64, codes minus the weight zero-point
    weight_scale: torch.Tensor  # [C_out]
    acc_scale: torch.Tensor  # [C_out] float32: s_x * s_w as onnxruntime forms it
    bias: torch.Tensor | None  # int64 [C_out]
    weight_form: IntegerForm | None = None
    bias_rescaled: dict[int, float] = field(default_factory=dict)  # channel: weight change
    plan: SumPlan | None = None  # how the sums are computed exactly
    acc_bound: int = 0  # no accumulator exceeds this in magnitude

    @property
    def x_bound(self) -> int:
        """The largest centred input code magnitude the input grid allows."""
        g = self.input_grid
        return int(torch.maximum((g.qmin - g.zero_point).abs(), (g.qmax - g.zero_point).abs())
                   .max())


def layer_form(name: str, mod: nn.Module) -> LayerForm:
    """The integer form of one quantized conv/linear (raises for what has none)."""
    if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
        raise ExportError(f"layer {name!r}: padding mode {mod.padding_mode!r} is not exported")
    if mod.weight_quant is None or mod.input_quant is None:
        side = "weight" if mod.weight_quant is None else "input"
        raise ExportError(f"layer {name!r} has no {side} quantizer: it is not an integer layer; "
                          "quantize both weight and input, or exclude the layer (kept float)")
    grid = Grid.of(mod.input_quant)
    wq = mod.weight_quant
    Grid.of(wq)
    form = wq.integer_form(mod.weight.detach())
    c_out = mod.weight.shape[0]
    w_scale = form.scale.float().reshape(-1).expand(c_out) if form.scale.numel() == 1 \
        else form.scale.float().reshape(-1)
    if form.axis not in (None, 0) and form.scale.numel() > 1:
        raise ExportError(f"layer {name!r}: weight scales must be per output channel (axis 0)")
    w_zp = form.zero_point.to(torch.int64).reshape(-1)
    shape = [-1] + [1] * (mod.weight.dim() - 1)
    codes = form.codes.to(torch.int64) - (w_zp.reshape(shape) if w_zp.numel() > 1 else w_zp)
    x_scale = grid.scale
    if x_scale.numel() > 1:
        groups = getattr(mod, "groups", 1)
        if not (groups == mod.weight.shape[0] == x_scale.numel()):
            raise ExportError(
                f"layer {name!r}: per-channel input scales are integer-runnable only on a "
                "depthwise conv (one input channel per output channel); use per-tensor "
                "activation scales here")
    w_scale = _dead_channel_scales(mod.bias, x_scale, w_scale, codes)
    rescaled: dict[int, float] = {}
    if mod.bias is not None:
        codes, w_scale, form, rescaled = _fit_bias(name, mod, x_scale, w_scale, codes, form)
    acc_scale = (x_scale * w_scale).float()
    bias = None
    if mod.bias is not None:
        bias = round_half_even(mod.bias.detach().double() / acc_scale.double()).to(torch.int64)
    lf = LayerForm(name, mod, grid, codes, w_scale, acc_scale, bias, form, rescaled)
    lf.plan = plan_sums(codes, lf.x_bound)
    lf.acc_bound = lf.plan.bound + (int(bias.abs().max()) if bias is not None else 0)
    return lf


def _fit_bias(name: str, mod: nn.Module, x_scale, w_scale, codes, form):
    """Channels whose bias would not fit int32 at ``s_x * s_w`` (weights a million times
    smaller than their bias: near-dead channels) get the smallest weight scale at which it fits
    (a power of two for power-of-two kinds), their weight codes re-rounded onto it, as TFLite's
    converter does. Returns the new codes, scales, form and ``{channel: largest weight
    change}``; integer runtimes cannot hold such a bias otherwise."""
    need = mod.bias.detach().double().abs() / (x_scale.double() * 2**30)
    over = (w_scale.double() < need) & (mod.bias.detach().double().abs()
                                        / (x_scale.double() * w_scale.double()) > INT32_MAX)
    if not bool(over.any()):
        return codes, w_scale, form, {}
    if bool((form.zero_point != 0).any()) or (form.bits == 1 and form.signed):
        raise ExportError(f"layer {name!r}: the bias of {int(over.sum())} channel(s) does not "
                          "fit int32 at s_x * s_w, and its weight grid cannot be widened")
    new = need.float()
    if form.power_of_two:
        new = torch.pow(2.0, torch.ceil(torch.log2(need))).float()
    w_scale = torch.where(over, new, w_scale)
    shape = [-1] + [1] * (codes.dim() - 1)
    qmin, qmax = form.qrange
    w = mod.weight.detach()
    recoded = torch.round(w.double() / w_scale.double().reshape(shape)).clamp(qmin, qmax)
    codes = torch.where(over.reshape(shape), recoded.to(torch.int64), codes)
    before = form.dequantize()
    exponent = (torch.frexp(w_scale)[1] - 1).to(torch.int32) if form.power_of_two else None
    form = IntegerForm(codes.to(torch.int32), w_scale.clone(), form.zero_point, form.bits,
                       form.signed, 0, form.narrow_range, exponent)
    change = (form.dequantize() - before).abs().reshape(codes.shape[0], -1).amax(dim=1)
    return codes, w_scale, form, {int(c): float(change[c]) for c in over.nonzero().flatten()}


def _dead_channel_scales(bias, x_scale: torch.Tensor, w_scale: torch.Tensor,
                         codes: torch.Tensor) -> torch.Tensor:
    """A channel whose weight codes are all zero (a dead channel: its output is its bias) may
    take any weight scale; calibration leaves it a tiny one, which would make its int32 bias
    overflow and its accumulator scale useless for residual adds. It gets the layer's largest
    live scale, or more if its bias needs it. Live channels keep theirs."""
    dead = (codes.reshape(codes.shape[0], -1) == 0).all(dim=1)
    if not bool(dead.any()):
        return w_scale
    live = w_scale[~dead]
    floor = live.max() if live.numel() else torch.ones((), dtype=w_scale.dtype)
    want = torch.full_like(w_scale, float(floor)).double()
    if bias is not None:
        want = torch.maximum(want, bias.detach().double().abs() / (x_scale.double() * 2**30))
    return torch.where(dead, want.float(), w_scale)


def _exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def _accumulate(lf: LayerForm, x: torch.Tensor, dtype: torch.dtype = torch.int64):
    """Exact int32 accumulation of centred input codes ``x`` on ``lf.input_grid``: the sums
    by the layer's proved-exact path (:mod:`.exact_sums`), plus the bias; checked to fit int32
    unless the bound already proves it. ``dtype=torch.float64`` returns the integers as exact
    float64 (the caller checks ``lf.plan.path != "int64"``)."""
    acc = exact_sums(lf.module, x, lf.weight_codes, lf.plan, dtype)
    if lf.bias is not None:
        acc += lf.bias.reshape([1, -1] + [1] * (acc.dim() - 2)).to(dtype)
    if lf.acc_bound > INT32_MAX and bool((acc.abs() > INT32_MAX).any()):
        raise ExportError(f"layer {lf.name!r}: the accumulator overflows int32")
    return acc


def layer_output(lf: LayerForm, x: IntValue, grid: Grid | None = None,
                 stats: Stats | None = None) -> IntValue:
    """The layer on its input codes ``x``: the int32 accumulator, or with ``grid`` the
    accumulator requantized onto it. Where the bounds prove it exact (sums in float, every
    accumulator times the multiplier below ``2**53``) the two steps run fused in float64,
    which saves two int64 passes over the accumulator."""
    c = x.centred()
    if grid is not None:
        dims = c.dim()
        m, n = _multiplier(lf.acc_scale, grid, dims, stats)
        if lf.plan.path != "int64" and lf.acc_bound * int(m.max()) < FLOAT64_EXACT:
            acc = _accumulate(lf, c, torch.float64)
            q = _round_f64(acc, m, n, _dim1(grid.zero_point, dims), grid.qmin, grid.qmax)
            return IntValue(q, grid.scale, grid.zero_point, grid)
    out = IntValue(_accumulate(lf, c), lf.acc_scale, _ZERO)
    return out if grid is None else requantize(out, grid, stats)


def clamp_codes(v: IntValue, lo, hi) -> IntValue:
    """An activation clamp on codes or accumulators, its bounds rounded onto the grid; a bound
    outside a grid's code range changes nothing and is skipped."""
    scale, zp = v.per_dim1(v.scale.double()), v.per_dim1(v.zero_point)
    data = v.data
    if lo is not None:
        lo_c = (round_half_even(lo / scale) + zp).to(torch.int64)
        if v.grid is None or bool((lo_c > v.grid.qmin).any()):
            data = torch.maximum(data, lo_c)
    if hi is not None:
        hi_t = torch.as_tensor(hi, dtype=torch.float64)
        if hi_t.dim() == 1:
            hi_t = hi_t.reshape([1, -1] + [1] * (data.dim() - 2))
        hi_c = (round_half_even(hi_t / scale) + zp).to(torch.int64)
        if v.grid is None or bool((hi_c < v.grid.qmax).any()):
            data = torch.minimum(data, hi_c)
    return IntValue(data, v.scale, v.zero_point, v.grid)


def _avgpool(op: Op, v: IntValue) -> IntValue:
    x = _exact(v.centred())
    if op.attrs["global"]:
        n = x.shape[2] * x.shape[3]
        s = x.sum(dim=(2, 3), keepdim=not op.attrs.get("squeeze", False))
    else:
        kh, kw = op.attrs["kernel"]
        n = kh * kw
        s = F.avg_pool2d(x, op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"],
                         divisor_override=1)
    return IntValue(s.round().to(torch.int64), (v.scale.double() / n).float(), _ZERO)


def _slice_channels(t: torch.Tensor, index) -> torch.Tensor:
    idx = index if isinstance(index, tuple) else (index,)
    if len(idx) > 1 and t.numel() > 1:
        return t[idx[1]]
    return t


ADD_HEADROOM = 2.0**-20  # codes rescaled by at most 2**20 stay far inside int32


def _add(a: IntValue, b: IntValue, stats: Stats) -> IntValue:
    """Int32 add at one scale per channel, each operand rescaled by a dyadic factor: at the
    finer of the two scales, but at most ``2**20`` times finer than the coarser one, so the
    sum is exact wherever it fits in int32 and a grid after it rounds it once, as a float
    runtime does (rounding the finer operand first would turn values just off a tie of that
    grid into ties, frequent on power-of-two grids). Two accumulators whose exact sum would
    overflow int32 meet at the coarser scale instead."""
    dims = max(a.data.dim(), b.data.dim())
    sa, sb = _dim1(a.scale.float(), dims), _dim1(b.scale.float(), dims)
    coarse = torch.maximum(sa, sb)
    fine = torch.maximum(torch.minimum(sa, sb), coarse * ADD_HEADROOM)
    out = _sum_at(a, b, fine, dims, stats)
    if bool((out.abs() > INT32_MAX).any()) and a.grid is None and b.grid is None:
        fine = coarse
        out = _sum_at(a, b, fine, dims, stats)
    if bool((out.abs() > INT32_MAX).any()):
        raise ExportError("a residual add overflows int32")
    return IntValue(out, fine.reshape(-1), _ZERO)


def _sum_at(a: IntValue, b: IntValue, fine: torch.Tensor, dims: int, stats: Stats):
    out = None
    for v in (a, b):
        m, n = dyadic((_dim1(v.scale.float(), dims) / fine).float())
        stats.multipliers.append(m.flatten())
        part = scale_round(v.centred(), m, n)
        out = part if out is None else out + part
    return out


MAX_ALIGN = 30  # bits one operand of a two-grid add may be shifted left by


def add_codes(values: list[IntValue], grid: Grid, stats: Stats | None = None) -> IntValue:
    """Codes on different grids added straight onto ``grid`` (what QLinearAdd computes):
    ``round(sum_i M_i * (c_i - z_i)) + z``, each ``M_i = s_i / s`` dyadic, the sum exact."""
    dims = max(v.data.dim() for v in values)
    parts = []
    for v in values:
        m, n = dyadic((_dim1(v.scale.float(), dims) / _dim1(grid.scale, dims)).float())
        if stats is not None:
            stats.multipliers.append(m.flatten())
        parts.append((v.centred() * m, n))
    top = torch.stack([n.max() for _, n in parts]).max()
    total = 0
    for p, n in parts:
        if bool((top - n > MAX_ALIGN).any()):
            raise ExportError("a residual add joins grids whose scales differ by more than "
                              f"2**{MAX_ALIGN}; give both inputs one grid (a QAdd point)")
        total = total + torch.bitwise_left_shift(p, top - n)
    q = shift_round(total, top) + _dim1(grid.zero_point, dims)
    q = q.clamp(grid.qmin, grid.qmax)
    return IntValue(q, grid.scale, grid.zero_point, grid)


class IntegerModel:
    """Runs a calibrated lowbit model on integers, node by node of its fx graph.

    ``run(x)`` takes the float input the torch model takes and quantizes it with the first
    layer's input quantizer (its own ``integer_form``, bit-exact with the simulation); every
    later step is integer. It returns the float output (dequantized) and fills ``stats``.
    """

    def __init__(self, qmodel: nn.Module):
        self.model = qmodel
        self.graph: fx.Graph = trace(qmodel)
        self.modules = dict(qmodel.named_modules())
        self.ops: list[Op] = [describe(n, self.modules) for n in self.graph.nodes]
        self.layers = {op.name: layer_form(op.name, op.module) for op in self.ops
                       if op.kind == "layer"}
        self.targets = {op.node: requant_target(op.node, self.modules) for op in self.ops
                        if op.kind in ("layer", "avgpool", "add", "qadd", "concat")}
        self._targets_through_concat()
        self.stats = Stats()

    def _targets_through_concat(self) -> None:
        """An accumulator whose one way leads (through ops that commute with rounding) into a
        concat that is requantized onto a per-tensor grid is requantized onto that grid where
        it is made: concatenating and requantizing commute, and a layer then ends in its
        integer kernel instead of in float."""
        for op in self.ops:
            q = self.targets.get(op.node) if op.kind == "concat" else None
            if q is None or Grid.of(q).scale.numel() != 1:
                continue
            for node, target in self.targets.items():
                if target is None and node is not op.node:
                    _, user = chain_end(node, self.modules)
                    if user is not None and user.node is op.node:
                        self.targets[node] = q

    @property
    def power_of_two(self) -> bool:
        """Every grid a requantization touches is a power of two."""
        return all(lf.input_grid.power_of_two and lf.weight_form.power_of_two
                   for lf in self.layers.values())

    def _codes_for(self, v, grid: Grid, q: Quantizer) -> IntValue:
        if isinstance(v, torch.Tensor):
            form = q.integer_form(v.detach())
            return IntValue(form.codes.to(torch.int64), grid.scale, grid.zero_point, grid)
        if v.grid is not None and v.grid.same(grid):
            return v
        return requantize(v, grid, self.stats)

    def _maybe_requant(self, node: fx.Node, v: IntValue) -> IntValue:
        q = self.targets.get(node)
        if q is None:
            return v
        return requantize(v, Grid.of(q), self.stats)

    def _layer(self, op: Op, v) -> IntValue:
        lf = self.layers[op.name]
        x = self._codes_for(v, lf.input_grid, op.module.input_quant)
        self.stats.layer_inputs[op.name] = x.data
        q = self.targets.get(op.node)
        return layer_output(lf, x, None if q is None else Grid.of(q), self.stats)

    def _qadd(self, op: Op, a, b) -> IntValue:
        return qadd(op, [a, b], self._codes_for, self.targets.get(op.node), self.stats)

    def _float(self, op: Op, args):
        self.stats.float_ops[op.name] = op.kind
        real = [a.real() if isinstance(a, IntValue) else a for a in args]
        return op.module(*real)

    def _step(self, op: Op, env: dict):
        args = [resolve(a, env) for a in op.args]
        k = op.kind
        if k == "layer":
            return self._layer(op, args[0])
        if k == "qadd":
            return self._qadd(op, args[0], args[1])
        if k == "quant":
            return self._codes_for(args[0], Grid.of(op.module), op.module)
        if k == "float":
            return self._float(op, args)
        if k == "size":
            x = args[0]
            data = x.data if isinstance(x, IntValue) else x
            return data.size(*args[1:])
        if k == "getitem" and not isinstance(args[0], (torch.Tensor, IntValue)):
            return args[0][op.attrs["index"]]
        if k == "concat":
            return self._concat(op, args[0])
        if k == "const":
            return op.attrs["value"]
        if k == "float_fn":  # a function with constant weights, on real values
            self.stats.float_ops[op.name] = "float function"
            real = [a.real() if isinstance(a, IntValue) else a for a in args]
            return op.node.target(*real, **op.node.kwargs)
        x = args[0]
        if not isinstance(x, IntValue):  # a float region (before the first quantizer)
            return self._float_op(op, env)
        if k == "pixel_shuffle":
            if x.scale.numel() > 1:
                raise ExportError(f"{op.name}: pixel shuffle of a tensor with per-channel "
                                  "scales mixes channels; requantize it first")
            return IntValue(F.pixel_shuffle(x.data, op.attrs["factor"]), x.scale,
                            x.zero_point, x.grid)
        if k == "upsample":
            f = op.attrs["factor"]
            data = x.data.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
            return IntValue(data, x.scale, x.zero_point, x.grid)
        if k == "clamp":
            return clamp_codes(x, op.attrs["lo"], op.attrs["hi"])
        if k == "identity":
            return x
        if k in ("flatten", "reshape"):
            data = x.data.flatten(op.attrs["start"], op.attrs["end"]) if k == "flatten" \
                else x.data.reshape([resolve(s, env) for s in op.attrs["shape"]])
            if x.scale.numel() > 1 and (data.dim() < 2 or data.shape[1] != x.scale.numel()):
                raise ExportError(f"{op.name}: reshaping a tensor with per-channel scales "
                                  "mixes channels; requantize it first")
            return IntValue(data, x.scale, x.zero_point, x.grid)
        if k == "maxpool":
            a = op.attrs
            pooled = F.max_pool2d(_exact(x.data), a["kernel"], a["stride"], a["padding"])
            return IntValue(pooled.round().to(torch.int64), x.scale, x.zero_point, x.grid)
        if k == "avgpool":
            return self._maybe_requant(op.node, _avgpool(op, x))
        if k == "pad":
            return self._pad(op, x)
        if k == "slice":
            idx = op.attrs["index"]
            return IntValue(x.data[idx], _slice_channels(x.scale, idx),
                            _slice_channels(x.zero_point, idx), x.grid)
        if k == "add":
            a, b = args
            if not isinstance(b, IntValue):
                self.stats.float_ops[op.name] = "add of a float value"
                return a.real() + b
            return self._maybe_requant(op.node, _add(a, b, self.stats))
        raise ExportError(f"{op.name}: the integer model cannot run {k!r} here")

    def _concat(self, op: Op, parts: list):
        """Codes on one grid concatenate as they are. On different grids, with a per-tensor
        grid the concat is requantized onto (its target: the next quantizer), each input is
        requantized onto it first (dyadic multiplier, a shift between power-of-two grids), so
        the codes concatenate on one grid; otherwise, along channels, the result carries
        per-channel scales and zero-points for the next quantizer to requantize."""
        dim = op.attrs["dim"]
        if not all(isinstance(v, IntValue) for v in parts):
            self.stats.float_ops[op.name] = "concat of a float value"
            return torch.cat([v.real() if isinstance(v, IntValue) else v for v in parts], dim)
        first = parts[0]
        if not (first.grid is not None and all(v.grid is not None and v.grid.same(first.grid)
                                               for v in parts)):
            q = self.targets.get(op.node)
            grid = Grid.of(q) if q is not None else None
            if grid is None or grid.scale.numel() != 1:
                return self._concat_channels(op, parts)
            parts = [v if v.grid is not None and v.grid.same(grid) else
                     requantize(v, grid, self.stats) for v in parts]
            first = parts[0]
        data = torch.cat([v.data for v in parts], dim)
        return IntValue(data, first.scale, first.zero_point, first.grid)

    def _concat_channels(self, op: Op, parts: list[IntValue]) -> IntValue:
        dim = op.attrs["dim"]
        data = torch.cat([v.data for v in parts], dim)
        if dim % data.dim() != 1:
            raise ExportError(f"{op.name}: concat of tensors on different grids is exported "
                              "along channels only, unless the concat goes straight to one "
                              "quantizer; give them one grid")

        def per_channel(t, v):
            return t.reshape(-1).expand(v.data.shape[1]) if t.numel() == 1 else t.reshape(-1)

        scale = torch.cat([per_channel(v.scale.float(), v) for v in parts])
        zp = torch.cat([per_channel(v.zero_point, v) for v in parts])
        return IntValue(data, scale, zp, None)

    def _pad(self, op: Op, x: IntValue) -> IntValue:
        """Zero padding in real units: the zero-point's code (one pass when it is one)."""
        pad = op.attrs["pad"]
        scale, zp = x.scale, x.zero_point
        if len(pad) >= 6 and (pad[4] or pad[5]):  # channels padded: grids grow with them
            if scale.numel() > 1:  # new channels hold zeros: any scale; the finest costs nothing
                scale = F.pad(scale, (pad[4], pad[5]), value=float(scale.min()))
            if bool((zp != 0).any()) and zp.numel() > 1:
                raise ExportError(f"{op.name}: padding channels of a per-channel grid with "
                                  "zero-points is not exported")
        if zp.numel() == 1:
            out = F.pad(x.data, pad, value=int(zp))
        else:
            out = F.pad(x.centred(), pad) + _dim1(zp, x.data.dim())
        return IntValue(out, scale, zp, x.grid)

    def _float_op(self, op: Op, env: dict):
        """An op before the first quantizer: the node itself on float values, with all of its
        arguments (``op.args`` keeps only the tensors)."""
        node = op.node

        def real(a):
            a = resolve(a, env)
            return a.real() if isinstance(a, IntValue) else a

        args = [real(a) for a in node.args]
        kwargs = {k: real(v) for k, v in node.kwargs.items()}
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Integer inference from the float model input; returns the dequantized output."""
        self.stats = Stats()
        env: dict = {}
        out = None
        for op in self.ops:
            if op.kind == "input":
                env[op.node] = x
            elif op.kind == "output":
                out = env[op.args[0]]
            else:
                env[op.node] = self._step(op, env)
        return out.real() if isinstance(out, IntValue) else out

    def output_codes(self, x: torch.Tensor) -> IntValue:
        """The integer output before dequantization (codes or accumulator)."""
        env: dict = {}
        for op in self.ops:
            if op.kind == "input":
                env[op.node] = x
            elif op.kind == "output":
                return env[op.args[0]]
            else:
                env[op.node] = self._step(op, env)
        raise ExportError("the graph has no output")


def qadd(op: Op, args: list, codes_for, target: Quantizer | None, stats: Stats) -> IntValue:
    """A QAdd: passthrough inputs keep their grids, the others are requantized onto the
    QAdd's; on one grid the codes add in int32, on two they go straight onto the target grid
    (:func:`add_codes`)."""
    q = op.module.quant
    grid = Grid.of(q)
    vals = []
    for v, through in zip(args, op.module.passthrough, strict=True):
        on_grid = through and isinstance(v, IntValue) and v.grid is not None
        vals.append(v if on_grid else codes_for(v, grid, q))
    if all(v.grid.same(vals[0].grid) for v in vals):
        out = IntValue(vals[0].centred() + vals[1].centred(), vals[0].grid.scale, _ZERO)
        return out if target is None else requantize(out, Grid.of(target), stats)
    if target is None:
        return _add(vals[0], vals[1], stats)
    return add_codes(vals, Grid.of(target), stats)


def integer_model(qmodel: nn.Module) -> IntegerModel:
    """The integer-only reference of a calibrated lowbit model."""
    return IntegerModel(qmodel)


__all__ = ["Grid", "IntValue", "IntegerModel", "dyadic", "int_range", "integer_model",
           "requantize", "shift_round"]


@torch.no_grad()
def code_agreement(qmodel: nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per quantized layer, how the codes at its input differ between the fake-quant
    simulation and the integer reference on ``x``: fraction of elements off (by any amount)
    and the largest difference in codes."""
    im = IntegerModel(qmodel)
    im.run(x)
    sim: dict[str, torch.Tensor] = {}
    handles = []
    for name in im.layers:
        mod = qmodel.get_submodule(name)

        def hook(m, inputs, n=name):
            sim[n] = m.input_quant.integer_form(inputs[0]).codes.to(torch.int64)

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        qmodel(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, codes in im.stats.layer_inputs.items():
        d = (codes - sim[name]).abs()
        out[name] = {"off": float((d > 0).double().mean()), "max": int(d.max())}
    return out


@torch.no_grad()
def requant_agreement(qmodel: nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per quantized layer that is requantized straight into the next quantizer: that
    quantizer's codes in the simulation against the integer model's requantization of the
    layer's accumulator, both computed from the simulation's own input to the layer, so that
    differences made earlier do not carry over (``code_agreement`` measures those too).
    Returns the fraction of codes that differ and the largest difference, per layer."""
    im = IntegerModel(qmodel)
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []

    def record(m, inputs):
        seen.setdefault(id(m), []).append(inputs[0].detach())

    pairs = []
    for op in im.ops:
        target = im.targets.get(op.node) if op.kind == "layer" else None
        if target is None or sum(n.target == op.node.target for n in im.graph.nodes) != 1:
            continue
        pairs.append((op, target))
        for m in (op.module, target):
            if not any(h is m for h, _ in handles):
                handles.append((m, m.register_forward_pre_hook(record)))
    try:
        qmodel(x)
    finally:
        for _, h in handles:
            h.remove()
    out = {}
    for op, target in pairs:
        if len(seen.get(id(op.module), [])) != 1 or len(seen.get(id(target), [])) != 1:
            continue  # a quantizer read at several places (a QAdd's): no single answer
        lf = im.layers[op.name]
        xin = im._codes_for(seen[id(op.module)][0], lf.input_grid, op.module.input_quant)
        acc = IntValue(_accumulate(lf, xin.centred()), lf.acc_scale, _ZERO)
        env = {op.node: requantize(acc, Grid.of(target))}
        cur = op.node
        while len(cur.users) == 1:  # the ops between the layer and its target
            nxt = describe(next(iter(cur.users)), im.modules)
            if nxt.kind not in COMMUTING:
                break
            env[nxt.node] = im._step(nxt, env)
            cur = nxt.node
        ref = env[cur].data
        sim = target.integer_form(seen[id(target)][0]).codes.to(torch.int64)
        if ref.shape != sim.shape:
            continue
        d = (ref - sim).abs()
        out[op.name] = {"off": float((d > 0).double().mean()), "max": int(d.max())}
    return out
