"""The quantizer parameter contract (params / load_params) and the power-of-two exponent chooser."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError
from lowbit.quant import QUANTIZERS, QuantMode
from lowbit.quant.pot import MSE_CANDIDATES, choose_exponent, pow2, round_exponent, zero_point_for

KINDS = sorted(k for k in QUANTIZERS if k != "base")


def calibrated(kind, x, **kw):
    q = QUANTIZERS[kind](**kw)
    q.mode = QuantMode.CALIBRATE
    q(x)
    q.finish_calibration()
    q.mode = QuantMode.QUANTIZE
    return q


shapes = st.sampled_from([(4, 3, 5), (2, 8)])
options = st.fixed_dictionaries({
    "bits": st.integers(2, 8),
    "symmetric": st.booleans(),
    "per_channel": st.booleans(),
    "signed": st.sampled_from([True, False, None]),
})


def _ok(kind, kw):
    return not (kind in ("qil", "pact") and not kw["symmetric"])  # symmetric by design


@settings(max_examples=30)
@given(kind=st.sampled_from(KINDS), kw=options, shape=shapes, seed=st.integers(0, 2**16))
def test_round_trip_keeps_the_quantized_output(kind, kw, shape, seed):
    if not _ok(kind, kw):
        return
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    q = calibrated(kind, x, **kw)
    before = q(x)
    p = q.params()
    assert {"scale", "zero_point"} <= set(p) and set(p) == set(q.param_names)
    assert p["zero_point"].dtype == torch.int32 and (p["scale"] > 0).all()
    fresh = QUANTIZERS[kind](**{**kw, "signed": q.signed})
    fresh.load_params(p)  # a never-calibrated quantizer takes a full set
    fresh.mode = QuantMode.QUANTIZE
    q.load_params(p)
    assert torch.equal(q(x), before) and torch.equal(fresh(x), before)
    assert torch.equal(q.scale_zero_point()[0], p["scale"])
    for k, v in q.params().items():
        assert torch.equal(v, p[k]), k


def test_params_are_copies():
    q = calibrated("lsq", torch.randn(4, 5), per_channel=True)
    p = q.params()
    p["scale"].mul_(2)
    assert not torch.equal(q.params()["scale"], p["scale"])


@pytest.mark.parametrize("kind", KINDS)
def test_bad_params_are_refused(kind):
    q = calibrated(kind, torch.randn(4, 5), per_channel=True, symmetric=True, bits=4)
    good = q.params()
    bad = [
        ({"nonsense": good["scale"]}, "has no parameter"),
        ({"scale": torch.full((3,), float("nan"))}, "finite"),
        ({"zero_point": torch.tensor([0.5, 0, 0, 0])}, "integers|zero-point"),
        ({"zero_point": torch.ones(4, dtype=torch.int32)}, "zero-point is 0"),
    ]
    if kind in ("uniform", "lsq", "sdq"):
        bad.append(({"scale": good["scale"][:2]}, "needs 4 value"))
        bad.append(({"scale": -good["scale"]}, "positive"))
    if kind == "pot":
        bad.append(({"exponent": torch.tensor([0.5, 0, 0, 0])}, "must be integers"))
        bad.append(({"scale": good["scale"] * 1.5}, "exact power of two"))
        bad.append(({"scale": good["scale"], "exponent": good["exponent"] + 1}, "not 2\\*\\*exponent"))
        bad.append(({"exponent": torch.full((4,), 500)}, "float32 range"))
    if kind == "qil":
        bad.append(({"d": -good["d"]}, "positive"))
        bad.append(({"scale": good["scale"] * 2}, "disagrees"))
    if kind == "pact":
        bad.append(({"alpha": -good["alpha"]}, "positive"))
        bad.append(({"scale": good["scale"] * 2, "alpha": good["alpha"]}, "disagrees"))
    for params, match in bad:
        with pytest.raises(ConfigError, match=match):
            q.load_params(params)
    for k, v in q.params().items():  # nothing half-written
        assert torch.equal(v, good[k]), k


def test_uncalibrated_needs_the_required_params_and_a_sign():
    q = QUANTIZERS["pot"](bits=4, signed=True)
    with pytest.raises(ConfigError, match="needs exponent"):
        q.load_params({"clip_lo": torch.zeros(1)})
    with pytest.raises(ConfigError, match="signedness"):
        QUANTIZERS["uniform"](bits=4).load_params({"scale": torch.ones(1),
                                                   "zero_point": torch.zeros(1)})
    q.load_params({"scale": torch.tensor([0.25])})
    assert q.calibrated and q.params()["exponent"].tolist() == [-2]


@given(x=st.integers(0, 2**16), shift=st.integers(-3, 3))
def test_pot_exponent_recomputes_the_zero_point_from_the_bound(x, shift):
    data = torch.randn(50, generator=torch.Generator().manual_seed(x)) + 0.5
    q = calibrated("pot", data, bits=4, symmetric=False, signed=True)
    p = q.params()
    q.load_params({"exponent": p["exponent"] + shift})
    qmin, qmax = q.qrange
    want = zero_point_for(p["clip_lo"], pow2(p["exponent"] + shift), qmin, qmax)
    assert torch.equal(q.params()["zero_point"], want.to(torch.int32))


def test_power_of_two_flag():
    assert [k for k in KINDS if QUANTIZERS[k].power_of_two] == ["pot"]


# --- the exponent chooser -----------------------------------------------------------------

log2s = st.lists(st.floats(-20, 20, allow_nan=False).map(lambda v: round(v * 4) / 4),
                 min_size=1, max_size=8)


@given(log2s)
def test_round_exponent_rules(values):
    t = torch.tensor(values)
    assert torch.equal(round_exponent(t), torch.round(t))  # ties to even: 0.5 -> 0, 1.5 -> 2
    assert torch.equal(round_exponent(t, "floor"), torch.floor(t))
    assert torch.equal(round_exponent(t, "ceil"), torch.ceil(t))
    s = t.clone().requires_grad_()
    out = round_exponent(s, ste=True)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.round(t)) and torch.equal(s.grad, torch.ones_like(t))
    with pytest.raises(ConfigError, match="nearest, floor or ceil"):
        round_exponent(t, "up")


@given(st.lists(st.lists(st.integers(0, 5), min_size=4, max_size=4), min_size=1, max_size=6),
       st.lists(st.integers(-10, 10), min_size=1, max_size=6))
def test_choose_exponent_keeps_the_first_least_error(errors, bases):
    n = min(len(errors), len(bases))
    table = torch.tensor(errors[:n], dtype=torch.float32)  # [n, candidates]
    base = torch.tensor(bases[:n], dtype=torch.int32)
    offsets = (0, -1, 1, 2)
    calls = iter(range(len(offsets)))
    k, err, pick = choose_exponent(base, offsets, lambda k: table[:, next(calls)])
    first_min = torch.tensor([row.index(min(row)) for row in (r[:4] for r in errors[:n])])
    assert torch.equal(pick, first_min)
    assert torch.equal(k, base + torch.tensor(offsets)[first_min].to(torch.int32))
    assert torch.equal(err, table.min(dim=1).values)


def test_choose_exponent_ignores_non_finite_errors_and_clamps():
    base = torch.tensor([127, 0])
    errs = iter([torch.tensor([float("nan"), float("inf")]), torch.tensor([1.0, float("nan")])])
    k, err, pick = choose_exponent(base, (0, 1), lambda k: next(errs))
    assert k.tolist() == [127, 0] and pick.tolist() == [1, -1]  # 128 clamped to 127


@settings(max_examples=30)
@given(seed=st.integers(0, 2**16), symmetric=st.booleans(), bits=st.integers(2, 6))
def test_mse_rounding_picks_the_least_squared_error(seed, symmetric, bits):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 40, generator=g) * torch.tensor([[0.1], [1.0], [7.0]])
    q = calibrated("pot", w, bits=bits, per_channel=True, symmetric=symmetric,
                   signed=True, observer="mse", rounding="mse")
    chosen = q.params()["exponent"]
    errs = []
    for d in MSE_CANDIDATES:  # the chosen exponent is no worse than any other candidate
        q.load_params({"exponent": chosen + d})
        errs.append((q(w) - w).pow(2).mean(dim=1))
    q.load_params({"exponent": chosen})
    best = (q(w) - w).pow(2).mean(dim=1)
    assert (best <= torch.stack(errs).min(0).values * (1 + 1e-6) + 1e-12).all()
