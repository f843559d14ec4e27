"""Discrete search of power-of-two exponents inside a reconstruction unit."""

import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.errors import ConfigError
from lowbit.ptq.exponent_search import ZP_DELTAS, _signed_asymmetric, search_unit_exponents
from lowbit.ptq.reconstruct import ReconOptions, default_lr_round, reconstruct_unit
from lowbit.quant import PoTQuantizer


class DwPair(nn.Module):
    """1x1 conv -> ReLU -> depthwise 3x3: one unit with a per-channel depthwise input."""

    def __init__(self, c=6):
        super().__init__()
        self.pw = nn.Conv2d(3, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        return self.dw(torch.relu(self.pw(x)))


def prepared(seed: int, per_channel_dw: bool = True):
    torch.manual_seed(seed)
    model = DwPair().eval()
    with torch.no_grad():  # channels of very different ranges, as real depthwise convs have
        model.dw.weight.mul_(torch.logspace(-1, 1, 6)[:, None, None, None])
        model.pw.weight.mul_(torch.logspace(0.5, -0.5, 6)[:, None, None, None])
    x = torch.randn(24, 3, 6, 6)
    cfg = QuantConfig.uniform(4, 4, dw_act_per_channel=per_channel_dw, first_last="same")
    q = lowbit.ptq(model, "pot", [(x, torch.zeros(24))], cfg, x[:2], progress=False)
    return model, q, x


def dw_errors(q, x):
    """Per channel of the depthwise conv, fed ``x`` directly: the error its input quantizer adds
    (float weights) and the error its weight quantizer adds (quantized input)."""
    dw = q.dw
    with torch.no_grad():
        xq = dw.input_quant(x)
        a_err = (F.conv2d(xq, dw.weight, padding=1, groups=6)
                 - F.conv2d(x, dw.weight, padding=1, groups=6)).pow(2).sum((0, 2, 3))
        w_err = (F.conv2d(xq, dw.weight_quant(dw.weight), padding=1, groups=6)
                 - F.conv2d(xq, dw.weight, padding=1, groups=6)).pow(2).sum((0, 2, 3))
    return a_err, w_err


def pot_exponents(q):
    return {n: m.exponent.clone() for n, m in q.named_modules() if isinstance(m, PoTQuantizer)}


def pot_zero_points(q):
    return {n: m.zero_point.clone() for n, m in q.named_modules() if isinstance(m, PoTQuantizer)}


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000))
def test_each_depthwise_channel_ends_no_worse(seed):
    _, q, _ = prepared(seed)
    a = torch.relu(torch.randn(24, 6, 6, 6) * torch.logspace(-1, 1, 6)[:, None, None])
    a0, _ = dw_errors(q, a)
    k0 = q.dw.weight_quant.exponent.clone()
    changed = search_unit_exponents(q.dw, (a,), images=24)
    a1, w1 = dw_errors(q, a)
    assert (a1 <= a0 * (1 + 1e-5) + 1e-9).all()
    k = q.dw.weight_quant.exponent.clone()
    for d in (-1, 0, 1):  # the weight exponents tried, given the chosen input exponents
        q.dw.weight_quant.load_params({"exponent": k0 + d})
        assert (w1 <= dw_errors(q, a)[1] * (1 + 1e-5) + 1e-9).all()
    q.dw.weight_quant.load_params({"exponent": k})
    assert set(changed) == {"input_quant", "weight_quant"}


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 10_000))
def test_exponents_stay_integer_and_move_at_most_one(seed):
    _, q, x = prepared(seed)
    before, zp_before = pot_exponents(q), pot_zero_points(q)
    changed = search_unit_exponents(q, (x,), images=24)
    after, zp_after = pot_exponents(q), pot_zero_points(q)
    for n, m in q.named_modules():
        if isinstance(m, PoTQuantizer):
            assert m.exponent.dtype == torch.int32 and m.zero_point.dtype == torch.int32
            assert ((after[n] - before[n]).abs() <= 1).all()
            _, zp = m.scale_zero_point()
            assert torch.equal(zp, torch.round(zp))
            qmin, qmax = m.qrange
            assert ((zp >= qmin) & (zp <= qmax)).all()
    assert sum(changed.values()) == sum(
        int(((after[n] != before[n]) | (zp_after[n] != zp_before[n])).sum()) for n in after)


def test_search_recovers_from_exponents_one_octave_off():
    _, q, _ = prepared(1)
    a = torch.relu(torch.randn(24, 6, 6, 6))
    k = q.dw.weight_quant.exponent.clone()
    q.dw.weight_quant.load_params({"exponent": k + 1})  # every depthwise channel one octave too coarse
    search_unit_exponents(q.dw, (a,), images=24)
    found = q.dw.weight_quant.exponent.clone()
    _, w_found = dw_errors(q, a)
    q.dw.weight_quant.load_params({"exponent": k})
    _, w_start = dw_errors(q, a)
    assert (w_found <= w_start * (1 + 1e-5) + 1e-9).all()
    assert (found <= k + 1).all() and (found >= k).all()


def test_per_tensor_depthwise_input_gets_one_exponent():
    _, q, x = prepared(2, per_channel_dw=False)
    search_unit_exponents(q, (x,), images=24)
    assert q.dw.input_quant.exponent.numel() == 1


def test_reconstruction_with_search_never_worse_than_its_start():
    model, q, x = prepared(3)
    with torch.no_grad():
        target = model(x)
    opts = ReconOptions(iters=40, progress=False, bn_weight=0.0, exponent_search=True)
    rep = reconstruct_unit(q, (x,), target, opts, pot=True)
    assert rep.error_after <= rep.error_before
    with torch.no_grad():
        assert ((q(x) - target).pow(2).sum(1).mean().item()
                <= rep.error_before * (1 + 1e-5))


def test_unit_keeps_the_search_when_reconstruction_ends_above_it():
    model, q, x = prepared(5)
    with torch.no_grad():
        target = model(x)
    k = q.dw.weight_quant.exponent.clone()
    q.dw.weight_quant.load_params({"exponent": k + 1})  # one octave too coarse: the search has work to do
    # a reconstruction made to fail: huge rounding steps flip every offset at random
    opts = ReconOptions(iters=5, lr_round=50.0, warmup=0.0, progress=False, bn_weight=0.0)
    rep = reconstruct_unit(q, (x,), target, opts, pot=True)
    assert rep.kept == "search" and rep.reverted
    assert set(rep.candidates) == {"start", "search", "reconstruction"}
    assert rep.candidates["reconstruction"] > rep.candidates["search"] == rep.error_after
    assert rep.error_after < rep.error_before and rep.exponents_changed > 0
    with torch.no_grad():  # the unit holds what the report says: searched exponents, nearest
        err = (q(x) - target).pow(2).sum(1).mean().item()
    assert abs(err - rep.error_after) <= 1e-5 * max(1.0, err)
    assert not torch.equal(q.dw.weight_quant.exponent, k + 1)


def test_reconstruction_learns_from_the_start_when_the_search_raised_the_error():
    model, q, x = prepared(6)
    with torch.no_grad():
        target = model(x)
    k = q.dw.weight_quant.exponent.clone()

    def bad_search(unit, args, chunk=64):  # a search that makes the unit worse
        unit.dw.weight_quant.load_params({"exponent": k + 2})
        return {"dw.weight_quant": k.numel()}

    opts = ReconOptions(iters=20, progress=False, bn_weight=0.0)
    with mock.patch("lowbit.ptq.reconstruct.search_unit_exponents", bad_search):
        rep = reconstruct_unit(q, (x,), target, opts, pot=True)
    assert rep.candidates["search"] > rep.candidates["start"]
    assert rep.recon_from == "start" and rep.kept != "search"
    assert torch.equal(q.dw.weight_quant.exponent, k) and rep.exponents_changed == 0


def test_reconstruction_learns_from_the_search_when_it_helped():
    model, q, x = prepared(5)
    with torch.no_grad():
        target = model(x)
    k = q.dw.weight_quant.exponent.clone()
    q.dw.weight_quant.load_params({"exponent": k + 1})
    opts = ReconOptions(iters=20, progress=False, bn_weight=0.0)
    rep = reconstruct_unit(q, (x,), target, opts, pot=True)
    assert rep.candidates["search"] < rep.candidates["start"]
    assert rep.recon_from == "search"
    assert not torch.equal(q.dw.weight_quant.exponent, k + 1)


def test_a_short_reconstruction_decides_its_rounding_by_default():
    """With the default learning rate, 200 steps take every rounding offset most of the way
    to 0 or 1; at 3e-3 (the old default) Adam moves an offset's logit by at most 0.6 in 200
    steps, most offsets stay soft and hardening them at the end undoes what was learned."""
    recon = importlib.import_module("lowbit.ptq.reconstruct")  # lowbit.ptq is also a function
    model, q, x = prepared(8)
    with torch.no_grad():
        target = model(x)
    offsets = []

    def spy(swaps, commit=True):
        offsets.extend(recon._rect_sigmoid(tq.v.detach()).flatten()
                       for _, _, tq in swaps if tq.v is not None)
        return unwrap(swaps, commit)

    unwrap = recon.unwrap_quantizers
    opts = ReconOptions(iters=200, progress=False, bn_weight=0.0, exponent_search=False)
    with mock.patch.object(recon, "unwrap_quantizers", spy):
        reconstruct_unit(q, (x,), target, opts, pot=True)
    h = torch.cat(offsets)
    assert ((h > 0.1) & (h < 0.9)).float().mean() < 0.1


def test_default_rounding_learning_rate_follows_the_steps():
    assert default_lr_round(100) == default_lr_round(300) == 0.1
    assert abs(default_lr_round(1000) - 0.03) < 1e-12
    assert abs(default_lr_round(20000) - 1.5e-3) < 1e-12  # BRECQ's regime
    assert ReconOptions(iters=1000).resolved_lr_round() == default_lr_round(1000)
    assert ReconOptions(iters=1000, lr_round=0.5).resolved_lr_round() == 0.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="lr_round"):
            ReconOptions(lr_round=bad).check()


def test_activation_scales_learned_for_float_scales_only_by_default():
    model, q, x = prepared(4)
    with torch.no_grad():
        target = model(x)
    k = q.dw.input_quant.exponent.clone()
    opts = ReconOptions(iters=30, progress=False, bn_weight=0.0, exponent_search=False)
    reconstruct_unit(q, (x,), target, opts, pot=True)
    assert torch.equal(q.dw.input_quant.exponent, k)

    cfg = QuantConfig.uniform(4, 4, first_last="same")
    fq = lowbit.ptq(model, "mse", [(x, torch.zeros(24))], cfg, x[:2], progress=False)
    s0 = fq.dw.input_quant.scale.clone()
    reconstruct_unit(fq, (x,), target, opts, pot=False)
    assert not torch.equal(fq.dw.input_quant.scale, s0)


class Linear1x1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.conv(x)


def input_error(q, x):
    conv = q.conv
    with torch.no_grad():
        return (conv._conv_forward(conv.input_quant(x), conv.weight, None)
                - conv._conv_forward(x, conv.weight, None)).pow(2).sum()


def searched(seed: int, skew: float, zero_points: bool):
    """A 1x1 conv fed a signed input (a residual stream) on an asymmetric 4-bit grid, after the
    search with or without its zero-point part; returns the model and its input error."""
    torch.manual_seed(seed)
    x = torch.randn(32, 4, 5, 5) + skew * torch.randn(32, 4, 5, 5).abs()
    cfg = QuantConfig.uniform(4, 4, first_last="same")
    q = lowbit.ptq(Linear1x1().eval(), "pot", [(x, torch.zeros(32))], cfg, x[:2], progress=False)
    assert _signed_asymmetric(q.conv.input_quant)
    with mock.patch("lowbit.ptq.exponent_search.ZP_DELTAS", ZP_DELTAS if zero_points else ()):
        search_unit_exponents(q, (x,), images=32)
    return q, input_error(q, x)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.floats(-1.0, 1.0))
def test_zero_point_search_never_worse_than_exponents_alone(seed, skew):
    q, err = searched(seed, skew, zero_points=True)
    _, err_exponents_only = searched(seed, skew, zero_points=False)
    assert q.conv.input_quant.zero_point.dtype == torch.int32
    assert err <= err_exponents_only * (1 + 1e-5) + 1e-9


def test_zero_point_search_finds_a_better_grid_position():
    q, err = searched(4, -0.8, zero_points=True)
    _, err_exponents_only = searched(4, -0.8, zero_points=False)
    assert err < 0.95 * err_exponents_only  # 41.2 -> 35.1 when written
