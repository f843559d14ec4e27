"""Power-of-two quantizer: exact 2**k scales, integer exponents and zero-points, as properties."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import ConfigError
from lowbit.ptq.reconstruct import TrainableQuant
from lowbit.quant import PoTQuantizer, QuantMode
from lowbit.quant.autograd import fake_quant, round_ste
from lowbit.quant.pot import MAX_EXPONENT, MIN_EXPONENT, is_pow2, pow2
from tests.helpers import calibrated as calibrated_quantizer


def calibrated(x, **kw):
    return calibrated_quantizer(PoTQuantizer, x, **kw)


tensors = st.integers(0, 2**31 - 1).map(
    lambda seed: torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(seed))
    * torch.rand(1, generator=torch.Generator().manual_seed(seed + 1)).item() * 10
    + torch.rand(1, generator=torch.Generator().manual_seed(seed + 2)).item() * 3
)
pkwargs = st.fixed_dictionaries({
    "bits": st.integers(2, 8),
    "symmetric": st.booleans(),
    "per_channel": st.booleans(),
    "observer": st.sampled_from(["minmax", "percentile", "mse"]),
    "signed": st.sampled_from([None, True, False]),
    "rounding": st.sampled_from(["nearest", "floor", "ceil"]),
})


def test_pow2_is_exact_over_the_float32_range():
    k = torch.arange(MIN_EXPONENT, MAX_EXPONENT + 1)
    s = pow2(k)
    mantissa, exp = torch.frexp(s)
    assert (mantissa == 0.5).all() and torch.equal(exp - 1, k.to(exp.dtype))
    with pytest.raises(ConfigError, match="out of float32 range"):
        pow2(torch.tensor([MAX_EXPONENT + 1]))


@given(x=tensors, kw=pkwargs)
def test_scale_is_exactly_pow2_with_integer_exponent_and_zero_point(x, kw):
    q = calibrated(x, **kw)
    assert q.exponent.dtype == torch.int32
    scale, zp = q.scale_zero_point()
    mantissa, exp = torch.frexp(scale)
    assert (mantissa == 0.5).all(), "every scale must be exactly 2**k"
    assert torch.equal(exp - 1, q.exponent)
    qmin, qmax = q.qrange
    assert torch.equal(zp, torch.round(zp)) and ((zp >= qmin) & (zp <= qmax)).all()
    if kw["symmetric"]:
        assert (zp == 0).all()


@given(x=tensors, kw=pkwargs)
def test_idempotent_and_codes_in_range(x, kw):
    q = calibrated(x, **kw)
    y = q(x)
    assert torch.equal(q(y), y), "fake quantization with a 2**k scale must be idempotent"
    form = q.integer_form(x)
    qmin, qmax = q.qrange
    assert form.codes.dtype == torch.int32 and form.zero_point.dtype == torch.int32
    assert form.codes.min() >= qmin and form.codes.max() <= qmax
    assert torch.equal(form.dequantize(), y), "the integer path must be bit-exact"


@given(x=tensors, shift=st.integers(-3, 3))
def test_zero_point_stays_integer_when_exponent_changes(x, shift):
    q = calibrated(x, bits=4, symmetric=False, signed=False)
    q.load_params({"exponent": q.exponent + shift})
    _, zp = q.scale_zero_point()
    assert q.zero_point.dtype == torch.int32 and torch.equal(zp, torch.round(zp))
    assert torch.equal(q(q(x)), q(x))


@given(x=tensors, shift=st.integers(-3, 3), move=st.integers(-3, 3))
def test_loaded_zero_point_keeps_its_bound_when_the_exponent_moves(x, shift, move):
    q = calibrated(x - x.mean(), bits=4, symmetric=False, signed=True)
    qmin, qmax = q.qrange
    z = (q.zero_point + move).clamp(qmin, qmax)
    q.load_params({"zero_point": z})
    assert torch.equal(q.zero_point, z) and q.zero_point.dtype == torch.int32
    lo = (qmin - z) * q.scale_zero_point()[0]  # the float value on the lowest code
    assert torch.equal(q.clip_lo, lo) and (q.clip_lo <= 0).all()
    k = q.exponent.clone()
    q.load_params({"exponent": k + shift})
    q.load_params({"exponent": k})
    assert torch.equal(q.zero_point, z), "a round trip of the exponent must keep the zero-point"


def test_loaded_zero_point_rejects_fractions_and_symmetric_grids():
    q = calibrated(torch.randn(10), bits=4, symmetric=False, signed=True)
    with pytest.raises(ConfigError, match="zero-points must be integers"):
        q.load_params({"zero_point": torch.tensor([0.5])})
    with pytest.raises(ConfigError, match="symmetric"):
        calibrated(torch.randn(10), bits=4, symmetric=True).load_params({"zero_point": torch.tensor([1])})


def test_nearest_rounding_is_in_the_log_domain():
    q = PoTQuantizer(bits=8, signed=True)
    q.init_from_params(torch.tensor([0.7, 0.75, 3.0]), torch.zeros(3), -torch.ones(3),
                       torch.ones(3))
    assert q.exponent.tolist() == [-1, 0, 2]  # log2: -0.51, -0.42, 1.58


def test_loaded_exponent_rejects_non_integers_and_bad_rounding():
    q = calibrated(torch.randn(10), bits=4)
    with pytest.raises(ConfigError, match="must be integers"):
        q.load_params({"exponent": torch.tensor([0.5])})
    with pytest.raises(ConfigError, match="rounding"):
        PoTQuantizer(rounding="up")


def test_state_dict_round_trip_keeps_integer_exponents():
    x = torch.randn(4, 3, 5)
    q = calibrated(x, bits=4, per_channel=True, symmetric=False)
    fresh = PoTQuantizer(bits=4, per_channel=True, symmetric=False)
    fresh.load_state_dict(q.state_dict())
    fresh.mode = QuantMode.QUANTIZE
    assert fresh.exponent.dtype == torch.int32 and torch.equal(fresh.exponent, q.exponent)
    assert torch.equal(fresh(x), q(x)) and is_pow2(fresh.scale_zero_point()[0])


def _channel_errors(q, x):
    """Squared quantization error per channel (all of ``x`` when per-tensor)."""
    err = (q(x) - x).pow(2)
    return err.flatten(1).mean(1) if q.per_channel else err.mean().reshape(1)


@given(x=tensors, bits=st.integers(2, 8), symmetric=st.booleans(), per_channel=st.booleans())
def test_mse_rounding_never_worse_than_nearest_floor_or_ceil(x, bits, symmetric, per_channel):
    """Least-error exponents: per channel at most the error of any fixed rounding of the same
    calibrated scale, still exact powers of two with integer zero-points."""
    kw = dict(bits=bits, symmetric=symmetric, per_channel=per_channel, observer="mse")
    best = calibrated(x, rounding="mse", **kw)
    assert best.exponent.dtype == torch.int32 and is_pow2(best.scale_zero_point()[0])
    mine = _channel_errors(best, x)
    for rounding in ("nearest", "floor", "ceil"):
        other = _channel_errors(calibrated(x, rounding=rounding, **kw), x)
        assert (mine <= other * (1 + 1e-6) + 1e-12).all(), rounding


def test_mse_rounding_keeps_the_largest_weight_unclipped_when_that_is_better():
    """A scale 1.3 times a power of two: nearest rounds it down and clips the outlier by 23 %;
    the least-error choice keeps it."""
    x = torch.tensor([127 * 1.3 / 32, 0.01, -0.02, 0.03]).repeat(4)
    near = calibrated(x, bits=8, observer="mse", rounding="nearest")
    best = calibrated(x, bits=8, observer="mse", rounding="mse")
    assert (near(x) - x).abs().max() > 0.5
    assert (best(x) - x).abs().max() <= best.scale_zero_point()[0].max() / 2


def test_mse_rounding_needs_an_observer_that_keeps_samples():
    with pytest.raises(ConfigError, match="observer='mse'"):
        calibrated(torch.randn(10), bits=4, observer="minmax", rounding="mse")


def _reference(tq, x):
    """The straight-through formula the fused kernels must match (LSQ scale gradient)."""
    t = tq.log2_scale.detach().clone().requires_grad_()
    s = torch.exp2(round_ste(t))
    zp = tq.zero_point(s.detach())
    b = tq.inner.broadcast
    return fake_quant(x, b(s, x), b(zp, x), tq.qmin, tq.qmax), t


@given(tensors, pkwargs)
def test_reconstruction_fake_quant_matches_the_straight_through_formula(x, kw):
    """Fixed scales run torch's plain kernels, learned ones the learnable kernels (routed around
    the per-tensor one's negative zero-point bug); values and gradients must be the formula's."""
    q = calibrated(x, **kw)
    g = torch.randn_like(x)
    xs = x * 1.5  # beyond the calibrated range: clipped values too
    for learn in (False, True):
        tq = TrainableQuant(q, pot=True, learn_scale=learn)
        xi = xs.clone().requires_grad_()
        y = tq(xi)
        xr = xs.clone().requires_grad_()
        yr, t = _reference(tq, xr)
        assert torch.equal(y, yr)
        (gx,) = torch.autograd.grad(y, xi, g)
        gxr, gt = torch.autograd.grad(yr, (xr, t), g)
        assert torch.equal(gx, gxr), f"input gradient differs (learn_scale={learn})"
        if learn:
            (gs,) = torch.autograd.grad(tq(xs), tq.log2_scale, g)
            assert torch.allclose(gs, gt, rtol=1e-4, atol=1e-3), (gs, gt)
