"""The SDQ stochastic-bitwidth quantizer: sampling, gradients through the expectation, step-down."""

import pytest
import torch

from lowbit import ConfigError, QuantizerSpec
from lowbit.quant import LSQQuantizer, QuantMode, SDQQuantizer, quantizer_class


def weight_quantizer(bits=4, dbp=0.3, **kw) -> SDQQuantizer:
    q = SDQQuantizer(bits=bits, signed=True, symmetric=True, per_channel=True, narrow_range=True,
                     **kw)
    w = torch.randn(6, 3, 3, 3)
    q.mode = QuantMode.CALIBRATE
    q(w)
    q.finish_calibration()
    q.mode = QuantMode.QUANTIZE
    with torch.no_grad():
        q.dbp.fill_(dbp)
    return q.train()


def branches(q: SDQQuantizer, x: torch.Tensor):
    with torch.no_grad():
        return q._fake_quant(x, q.bits - 1), q._fake_quant(x, q.bits)


def test_registered_and_built_from_a_config():
    assert quantizer_class("sdq") is SDQQuantizer
    q = QuantizerSpec(kind="sdq", bits=6, signed=True, options={"min_bits": 3}).build()
    assert isinstance(q, SDQQuantizer) and isinstance(q, LSQQuantizer)
    assert q.bits == 6 and q.min_bits == 3


def test_reversed_bounds_and_bad_dbp_are_clear_errors():
    with pytest.raises(ConfigError, match="reversed"):
        SDQQuantizer(bits=3, signed=True, min_bits=4)
    with pytest.raises(ConfigError, match="init_dbp"):
        SDQQuantizer(bits=3, signed=True, init_dbp=1.5)
    assert SDQQuantizer(bits=3, signed=True, min_bits=1).min_bits == 1  # binary weights


def test_forward_is_exactly_one_branch_and_frequency_matches_dbp():
    torch.manual_seed(0)
    q = weight_quantizer(bits=4, dbp=0.3)
    x = torch.randn(6, 3, 3, 3)
    lo, hi = branches(q, x)
    assert not torch.equal(lo, hi)
    n, low = 4000, 0
    with torch.no_grad():
        for _ in range(n):
            out = q(x)
            is_lo, is_hi = torch.equal(out, lo), torch.equal(out, hi)
            assert is_lo != is_hi  # bit-exact: the forward carries exactly the sampled bitwidth
            low += is_lo
    sigma = (0.3 * 0.7 / n) ** 0.5
    assert abs(low / n - 0.3) < 4 * sigma


def test_eval_is_deterministic_higher_bitwidth():
    q = weight_quantizer(bits=4, dbp=0.9).eval()
    x = torch.randn(6, 3, 3, 3)
    _, hi = branches(q, x)
    plain = LSQQuantizer(bits=4, signed=True, symmetric=True, per_channel=True, narrow_range=True)
    plain.load_state_dict({k: v for k, v in q.state_dict().items() if k != "dbp"})
    plain.mode = QuantMode.QUANTIZE
    for _ in range(5):
        assert torch.equal(q(x), hi)
    assert torch.equal(q(x), plain(x))


@pytest.mark.parametrize("pick_low", [True, False])
def test_gradients_flow_through_the_expectation(pick_low, monkeypatch):
    q = weight_quantizer(bits=3, dbp=0.25)
    x = torch.randn(6, 3, 3, 3, requires_grad=True)
    g = torch.randn(6, 3, 3, 3)
    monkeypatch.setattr(torch, "bernoulli", lambda p: torch.ones_like(p) * pick_low)
    out = q(x)
    (out * g).sum().backward()
    got = (x.grad.clone(), q.dbp.grad.clone(), q.scale.grad.clone())
    lo, hi = branches(q, x)
    assert torch.equal(out.detach(), lo if pick_low else hi)
    assert torch.allclose(got[1], (g * (lo - hi)).sum().reshape(1), rtol=1e-5)
    # the reference: autograd through the explicit expectation p*Q_lo + (1-p)*Q_hi
    x2 = x.detach().clone().requires_grad_(True)
    q.zero_grad()
    p = q.dbp.reshape(())
    ((p * q._fake_quant(x2, 2) + (1 - p) * q._fake_quant(x2, 3)) * g).sum().backward()
    assert torch.allclose(got[0], x2.grad, atol=1e-6)
    assert torch.allclose(got[1], q.dbp.grad, rtol=1e-5)
    assert torch.allclose(got[2], q.scale.grad, rtol=1e-4, atol=1e-7)


def test_dbp_gets_no_gradient_at_min_bits_or_when_not_searching():
    q = weight_quantizer(bits=2, dbp=0.5)
    x = torch.randn(6, 3, 3, 3)
    q(x).sum().backward()
    assert q.dbp.grad is None
    q2 = weight_quantizer(bits=4, dbp=0.5)
    q2.searching = False
    q2(x).sum().backward()
    assert q2.dbp.grad is None
    assert float(q2.expected_bits()) == 4.0
    assert float(weight_quantizer(bits=4, dbp=0.25).expected_bits().detach()) == pytest.approx(3.75)


def test_step_down_keeps_the_range_and_an_integer_zero_point():
    q = weight_quantizer(bits=5, dbp=0.95)
    s5 = q.scale.detach().clone()
    q.step_down()
    assert q.bits == 4 and float(q.dbp.detach()) == 0.0
    assert torch.allclose(q.scale.detach(), s5 * 15 / 7)  # same clipping range: 15*s5 == 7*s4
    act = SDQQuantizer(bits=6, signed=None, symmetric=False)
    act.mode = QuantMode.CALIBRATE
    act(torch.rand(64, 8) * 3 - 0.7)
    act.finish_calibration()
    lo_hi = lambda: ((act.qrange[0] - act.zero_point) * act.scale,  # noqa: E731
                     (act.qrange[1] - act.zero_point) * act.scale)
    before = lo_hi()
    for _ in range(3):
        act.step_down()
        zp = act.zero_point.detach()
        assert torch.equal(zp, torch.round(zp))
        assert act.qrange[0] <= float(zp) <= act.qrange[1]
    after = lo_hi()
    step = float(act.scale.detach())
    gap = [abs(float((a - b).detach())) for a, b in zip(after, before, strict=True)]
    assert max(gap) <= step
    with pytest.raises(ConfigError, match="cannot step down"):
        weight_quantizer(bits=2).step_down()


def test_state_dict_round_trip_keeps_bits_and_dbp():
    q = weight_quantizer(bits=6, dbp=0.4)
    q.step_down()
    with torch.no_grad():
        q.dbp.fill_(0.6)
    fresh = SDQQuantizer(bits=8, signed=True, symmetric=True, per_channel=True, narrow_range=True)
    fresh.load_state_dict(q.state_dict())
    fresh.mode = QuantMode.QUANTIZE
    assert fresh.bits == 5 and float(fresh.dbp.detach()) == pytest.approx(0.6)
    x = torch.randn(6, 3, 3, 3)
    assert torch.equal(fresh.eval()(x), q.eval()(x))
