"""Quantizer invariants as properties: grid, idempotence, integer zero-points, range, STE."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import CalibrationError, ConfigError
from lowbit.quant import (
    LSQQuantizer,
    QuantMode,
    UniformQuantizer,
    grad_scale,
    int_range,
    round_ste,
)
from tests.helpers import calibrated

KINDS = [UniformQuantizer, LSQQuantizer]




tensors = st.integers(0, 2**31 - 1).map(
    lambda seed: torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(seed))
    * torch.rand(1, generator=torch.Generator().manual_seed(seed + 1)).item() * 10
)
qkwargs = st.fixed_dictionaries({
    "bits": st.integers(2, 8),
    "symmetric": st.booleans(),
    "per_channel": st.booleans(),
    "observer": st.sampled_from(["minmax", "percentile", "mse"]),
    "signed": st.sampled_from([None, True]),
})


@given(x=tensors, kw=qkwargs, cls=st.sampled_from(KINDS))
def test_values_on_grid_with_integer_zero_point(x, kw, cls):
    q = calibrated(cls, x, **kw)
    y = q(x).detach()
    scale, zp = q.scale_zero_point()
    assert torch.equal(zp, torch.round(zp)), "zero-point must be an integer"
    qmin, qmax = q.qrange
    assert ((zp >= qmin) & (zp <= qmax)).all()
    codes = y / q.broadcast(scale, y) + q.broadcast(zp, y)
    assert torch.allclose(codes, torch.round(codes), atol=1e-3)
    assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3


@given(x=tensors, kw=qkwargs, cls=st.sampled_from(KINDS))
def test_idempotent(x, kw, cls):
    q = calibrated(cls, x, **kw)
    y = q(x).detach()
    assert torch.allclose(q(y), y, atol=1e-6)


@given(x=tensors, kw=qkwargs, cls=st.sampled_from(KINDS))
def test_integer_form_dequantizes_to_fake_quant(x, kw, cls):
    q = calibrated(cls, x, **kw)
    form = q.integer_form(x)
    qmin, qmax = q.qrange
    assert form.codes.dtype == torch.int32 and form.zero_point.dtype == torch.int32
    assert form.codes.min() >= qmin and form.codes.max() <= qmax
    assert form.bits == kw["bits"]
    assert torch.allclose(form.dequantize(), q(x).detach(), atol=1e-6, rtol=0)
    if cls is UniformQuantizer:
        assert torch.equal(form.dequantize(), q(x)), "uniform integer path must be bit-exact"


@given(bits=st.integers(1, 8), signed=st.booleans(), narrow=st.booleans())
def test_int_range_counts_levels(bits, signed, narrow):
    if signed and bits == 1:
        assert int_range(bits, signed, narrow) == (-1, 1)  # binary codes -1, +1
        return
    lo, hi = int_range(bits, signed, narrow)
    levels = hi - lo + 1
    assert levels == 2**bits - (1 if (signed and narrow) else 0)
    assert (lo < 0) == signed


def test_two_bit_narrow_signed_weights_are_ternary():
    w = torch.randn(8, 4, 3, 3)
    q = calibrated(UniformQuantizer, w, bits=2, signed=True, narrow_range=True, per_channel=True)
    form = q.integer_form(w)
    assert set(form.codes.unique().tolist()) <= {-1, 0, 1}


def test_asymmetric_activation_zero_point_and_unsigned_detection():
    x = torch.rand(64, 10) * 3 + 0.5
    q = calibrated(UniformQuantizer, x, bits=4, symmetric=False, signed=None)
    assert q.signed is False
    x2 = torch.randn(64, 10) - 1
    q2 = calibrated(UniformQuantizer, x2, bits=4, symmetric=False, signed=None)
    assert q2.signed is True
    _, zp = q2.scale_zero_point()
    assert zp.item() != 0 and zp.item() == round(zp.item())


def test_minmax_covers_range_and_percentile_clips_outlier():
    x = torch.cat([torch.linspace(-1, 1, 100_000), torch.tensor([50.0])])
    mm = calibrated(UniformQuantizer, x, bits=8, observer="minmax")
    pc = calibrated(UniformQuantizer, x, bits=8, observer="percentile")
    assert mm(x).max() == pytest.approx(50.0, rel=1e-3)
    assert pc(x).max() < 2.0


def test_mse_error_not_worse_than_minmax():
    x = torch.randn(4096) ** 3
    errs = {}
    for obs in ["minmax", "mse"]:
        q = calibrated(UniformQuantizer, x, bits=4, observer=obs)
        errs[obs] = (q(x) - x).pow(2).mean().item()
    assert errs["mse"] < errs["minmax"]


def test_mse_per_channel_not_worse_than_minmax_per_channel():
    w = torch.randn(16, 32) * torch.linspace(0.1, 3, 16)[:, None]
    w[0, 0] = 20
    out = {}
    for obs in ["minmax", "mse"]:
        q = calibrated(UniformQuantizer, w, bits=3, observer=obs, per_channel=True,
                       signed=True, narrow_range=True)
        out[obs] = (q(w) - w).pow(2).mean(dim=1)
    assert (out["mse"] <= out["minmax"] + 1e-7).all()


def test_ste_gradient_is_identity_inside_and_zero_outside_range():
    x = torch.linspace(-1, 1, 101)
    q = calibrated(UniformQuantizer, x * 0.5, bits=4, symmetric=True, signed=True)
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    scale, _ = q.scale_zero_point()
    lo, hi = -8 * scale.item(), 7 * scale.item()
    inside = (x > lo + 1e-3) & (x < hi - 1e-3)
    outside = (x < lo - scale.item()) | (x > hi + scale.item())
    assert torch.all(xg.grad[inside] == 1)
    assert torch.all(xg.grad[outside] == 0)


def test_round_ste_and_grad_scale_gradients():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, -2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    s = torch.tensor(2.0, requires_grad=True)
    z = grad_scale(s, 0.25)
    assert z.item() == 2.0
    z.backward()
    assert s.grad.item() == pytest.approx(0.25)


def test_lsq_step_size_learns_and_gradients_are_finite():
    x = torch.randn(32, 16)
    q = calibrated(LSQQuantizer, x, bits=3, signed=True)
    assert q.scale.requires_grad
    out = q(x)
    ((out - x) ** 2).mean().backward()
    assert torch.isfinite(q.scale.grad).all() and q.scale.grad.abs().sum() > 0


def test_lsq_asymmetric_zero_point_stays_integer_after_a_step():
    x = torch.rand(32, 16) + 0.3
    q = calibrated(LSQQuantizer, x, bits=4, symmetric=False, signed=True)
    opt = torch.optim.SGD(q.parameters(), lr=0.37)
    ((q(x) - x * 1.1) ** 2).mean().backward()
    opt.step()
    _, zp = q.scale_zero_point()
    assert torch.equal(zp, torch.round(zp))
    assert torch.equal(q.integer_form(x).zero_point.float(), zp)


@pytest.mark.parametrize("bits", [0, 9, 16, -1, 2.5])
def test_bits_out_of_range_rejected(bits):
    with pytest.raises(ConfigError, match="bits"):
        UniformQuantizer(bits=bits)


def test_signed_one_bit_rejected_unsigned_one_bit_allowed():
    with pytest.raises(ConfigError, match="at least 2 bits"):
        UniformQuantizer(bits=1, signed=True)
    q = calibrated(UniformQuantizer, torch.rand(100), bits=1, signed=False, symmetric=True)
    assert set(q.integer_form(torch.rand(100)).codes.unique().tolist()) <= {0, 1}


def test_missing_per_channel_axis_named():
    q = UniformQuantizer(bits=4, per_channel=True, ch_axis=3)
    q.name = "fc.weight_quant"
    q.mode = QuantMode.CALIBRATE
    with pytest.raises(ConfigError, match="axis 3 does not exist.*fc.weight_quant|fc.weight_quant.*axis 3"):
        q(torch.randn(4, 5))


def test_nan_during_calibration_names_the_layer():
    q = UniformQuantizer(bits=8)
    q.name = "layer2.0.conv1.input_quant"
    q.mode = QuantMode.CALIBRATE
    x = torch.randn(10)
    x[3] = float("nan")
    with pytest.raises(CalibrationError, match="layer2.0.conv1.input_quant"):
        q(x)
    x[3] = float("inf")
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        q(x)


def test_quantize_before_calibration_is_an_error():
    q = UniformQuantizer(bits=8)
    q.mode = QuantMode.QUANTIZE
    with pytest.raises(CalibrationError, match="never calibrated"):
        q(torch.randn(3))
    with pytest.raises(CalibrationError, match="saw no data"):
        q.finish_calibration()


@pytest.mark.parametrize("cls", KINDS)
def test_state_dict_round_trip_restores_per_channel_params_and_bits(cls):
    w = torch.randn(8, 3, 3, 3)
    q = calibrated(cls, w, bits=5, per_channel=True, signed=True)
    fresh = cls(bits=8, per_channel=True, signed=True)
    fresh.load_state_dict(q.state_dict())
    fresh.mode = QuantMode.QUANTIZE
    assert fresh.bits == 5 and fresh.calibrated
    assert torch.equal(fresh(w), q(w))


def test_float_mode_is_identity_and_calibrate_mode_passes_through():
    x = torch.randn(20)
    q = UniformQuantizer(bits=2)
    assert q(x) is x
    q.mode = QuantMode.CALIBRATE
    assert torch.equal(q(x), x)
    assert q.observer.batches == 1


def test_set_bits_changes_levels():
    x = torch.randn(1000)
    q = calibrated(UniformQuantizer, x, bits=8, signed=True)
    q.set_bits(3)
    assert q.bits == 3 and q.qrange == (-4, 3)
    with pytest.raises(ConfigError):
        q.set_bits(12)


def test_mse_observer_bounds_per_channel_activation_samples_and_keeps_weights_whole():
    from lowbit.quant.observers import MSEObserver

    obs = MSEObserver(axis=1, max_samples=1 << 12, min_per_channel=256)
    for _ in range(20):
        obs.update(torch.rand(4, 32, 16, 16))
    assert sum(s.shape[1] for s in obs.samples) <= 256
    assert obs.samples[0].shape[0] == 32
    w = torch.randn(64, 8, 3, 3)
    wobs = MSEObserver(axis=0, max_samples=1 << 12, min_per_channel=256)
    wobs.update(w)
    assert torch.equal(torch.cat(wobs.samples, 1), w.reshape(64, -1))


def test_mse_observer_samples_every_pixel_column_and_repeats():
    """A stride that is a multiple of the image width would sample one column only."""
    from lowbit.quant.observers import MSEObserver

    x = torch.arange(16.0).expand(8, 2, 4, 16).contiguous()  # value = column index
    runs = []
    for _ in range(2):
        obs = MSEObserver(max_samples=256)  # 16 values per batch from 1,024: every 64th before
        obs.update(x)
        runs.append(torch.cat(obs.samples, 1))
    assert runs[0].unique().numel() >= 8
    assert torch.equal(runs[0], runs[1])
