"""Binary (signed 1-bit) LSQ weights: {-s, +s} forward, exact integer form, gradients, configs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowbit import ConfigError, QuantConfig, QuantizerSpec, measure
from lowbit.config import LayerRule
from lowbit.prepare import calibrate, prepare, quant_layers
from lowbit.quant import LSQQuantizer, QuantMode, SDQQuantizer, int_range, quantizer_class
from tests.helpers import calibrated

W = dict(bits=1, signed=True, symmetric=True, narrow_range=True)


def binary(w: torch.Tensor, per_channel: bool = True, **kw) -> LSQQuantizer:
    return calibrated(LSQQuantizer, w, per_channel=per_channel, **W, **kw)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_forward_is_plus_minus_mean_abs_per_channel(observer):
    w = torch.randn(6, 3, 3, 3)
    w[0, 0, 0, 0] = 0.0
    q = binary(w, observer=observer)
    s = w.abs().mean(dim=(1, 2, 3))
    assert torch.allclose(q.scale.detach(), s)
    y, step = q(w).detach(), q.scale.detach()
    for c in range(6):
        assert set(y[c].unique().tolist()) == {-float(step[c]), float(step[c])}
    assert torch.equal(y, torch.where(w >= 0, 1.0, -1.0) * q.scale.detach()[:, None, None, None])
    assert y[0, 0, 0, 0] > 0  # sign(0) = +1
    assert q.qrange == (-1, 1) and int_range(1, True) == (-1, 1)


def test_per_tensor_binary_uses_one_step():
    w = torch.randn(4, 5)
    q = binary(w, per_channel=False)
    assert q.scale.numel() == 1 and torch.allclose(q.scale.detach(), w.abs().mean().reshape(1))
    assert q(w).detach().abs().unique().numel() == 1


@given(seed=st.integers(0, 2**16), per_channel=st.booleans(),
       shape=st.sampled_from([(3, 4), (2, 3, 2, 2), (5, 1, 3, 3)]))
def test_integer_form_reproduces_forward_and_binary_is_idempotent(seed, per_channel, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    q = binary(w, per_channel=per_channel)
    y = q(w).detach()
    form = q.integer_form(w)
    assert form.codes.dtype == torch.int32 and set(form.codes.unique().tolist()) <= {-1, 1}
    assert form.bits == 1 and form.signed and not form.zero_point.any()
    assert torch.equal(form.dequantize(), y)
    assert torch.equal(q(y).detach(), y)


def test_gradients_are_finite_and_reach_the_step():
    w = torch.randn(6, 3, 3, 3)
    q = binary(w)
    x = w.clone().requires_grad_(True)
    g = torch.randn_like(w)
    (q(x) * g).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(q.scale.grad).all()
    s = q.scale.detach()[:, None, None, None]
    assert torch.equal(x.grad, g * (w.abs() <= s))
    n = w[0].numel()
    want = (g * torch.where(w >= 0, 1.0, -1.0)).sum(dim=(1, 2, 3)) / n**0.5
    assert torch.allclose(q.scale.grad, want, rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    before = q.scale.detach().clone()
    opt.step()
    assert not torch.equal(before, q.scale.detach())


@pytest.mark.parametrize("kind", ["uniform", "pot", "qil"])
def test_kinds_without_binary_weights_refuse_signed_one_bit(kind):
    with pytest.raises(ConfigError, match=rf"'{kind}'.*at least 2 bits.*'lsq' or 'sdq'"):
        quantizer_class(kind)(bits=1, signed=True)
    with pytest.raises(ConfigError, match="at least 2 bits"):
        QuantizerSpec(kind=kind, bits=1, signed=True).build()
    quantizer_class(kind)(bits=1, signed=False)


def test_asymmetric_binary_is_a_clear_error():
    with pytest.raises(ConfigError, match="symmetric"):
        LSQQuantizer(bits=1, signed=True, symmetric=False)
    with pytest.raises(ConfigError, match="symmetric"):
        SDQQuantizer(bits=3, signed=True, symmetric=False, min_bits=1)


def test_state_dict_round_trip_keeps_binary():
    q = binary(torch.randn(4, 2, 3, 3))
    fresh = LSQQuantizer(bits=4, signed=True, per_channel=True, narrow_range=True)
    fresh.load_state_dict(q.state_dict())
    fresh.mode = QuantMode.QUANTIZE
    w = torch.randn(4, 2, 3, 3)
    assert fresh.bits == 1 and torch.equal(fresh(w), q(w))


def test_prepare_calibrate_one_bit_lsq_weights_and_cost_counts_one_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)).eval()
    x = torch.randn(4, 3, 4, 4)
    cfg = QuantConfig.uniform(8, 4, kind="lsq", observer="mse",
                              layers=[LayerRule(match="2", w_bits=1)])
    q = calibrate(prepare(model, cfg, x), [x], progress=False)
    assert torch.isfinite(q(x)).all()
    layer = dict(quant_layers(q))["2"]
    wq = layer.weight_quant
    assert wq.bits == 1 and wq.binary
    assert wq(layer.weight).detach().abs().unique().numel() <= 4  # one magnitude per channel
    rep = {r.name: r for r in measure(q, x).layers}
    assert rep["2"].w_bits == 1 and rep["2"].weight_bits == 4 * 4 * 9 * 1 + 4 * 32


def test_sdq_samples_binary_and_step_down_keeps_the_trained_step(monkeypatch):
    w = torch.randn(6, 3, 3, 3)
    q = calibrated(SDQQuantizer, w, bits=2, per_channel=True, signed=True, symmetric=True,
                   narrow_range=True, min_bits=1).train()
    assert q.can_step_down
    with torch.no_grad():
        q.dbp.fill_(0.5)
        lo, hi = q._fake_quant(w, 1), q._fake_quant(w, 2)
    for c in range(6):
        assert lo[c].unique().numel() == 2 and set(hi[c].unique().tolist()) <= set(
            (torch.tensor([-1.0, 0.0, 1.0]) * q.scale[c].detach()).tolist())
    monkeypatch.setattr(torch, "bernoulli", lambda p: torch.ones_like(p))
    x = w.clone().requires_grad_(True)
    out = q(x)
    assert torch.equal(out.detach(), lo)
    out.sum().backward()
    assert torch.isfinite(q.scale.grad).all() and q.dbp.grad is not None
    q.step_down()
    assert q.bits == 1 and not q.can_step_down
    assert torch.equal(q(w).detach(), lo)  # narrow 2-bit {-s,0,s} and binary {-s,s} share s


def test_ebr_bins_binary_weights_at_plus_minus_s():
    from lowbit.losses.ebr import bin_codes, bin_index

    w = torch.randn(4, 2, 3, 3)
    w[0, 0, 0, 0] = 0.0
    q = binary(w)
    v, e, qmin, qmax = bin_codes(w, q)
    assert (qmin, qmax) == (0, 1)
    assert torch.equal(bin_index(v, 0, 1).reshape(w.shape), (w >= 0).long())
    on_grid = q(w).detach().requires_grad_(True)
    v, e, _, _ = bin_codes(on_grid, q)
    assert e.abs().max() < 1e-6
    (e.pow(2).sum() + v.sum()).backward()
    assert torch.isfinite(on_grid.grad).all()
