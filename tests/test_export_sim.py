"""The bit-exact simulation against the integer reference and against exact rational
arithmetic; the default simulation's one-code differences."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.export import agreement, bit_exact
from lowbit.export.integer import IntegerModel
from lowbit.nn.points import insert_points
from tests.test_export import CONFIGS, Padded, Plain, Residual, quantized


@pytest.mark.parametrize("points", [True, False])
@pytest.mark.parametrize("model_cls", [Plain, Residual, Padded])
@pytest.mark.parametrize("config", ["w8a8", "w4a4", "w3a5", "pot_w4a8"])
def test_bit_exact_simulation_equals_the_integer_reference_on_every_layer(model_cls, config,
                                                                          points):
    q, x = quantized(model_cls, config, points=points)
    sim = bit_exact(q)
    agree = agreement(q, x[16:], sim)
    assert set(agree) - {"all"} == set(IntegerModel(q).layers)
    assert agree["all"]["off"] == 0 and agree["all"]["n"] > 0, agree
    assert torch.equal(sim(x[16:]), IntegerModel(q).run(x[16:]))


def test_default_simulation_differs_by_one_code_on_a_small_fraction():
    q, x = quantized(Residual, "w4a4", points=False)
    agree = agreement(q, x[16:])["all"]
    assert 0 < agree["one_frac"] < 0.05 and agree["max"] <= 2, agree
    assert agreement(q, x[16:], bit_exact(q))["all"]["off"] == 0


def _exact_codes(acc: torch.Tensor, mult: torch.Tensor, zp: int, lo: int, hi: int):
    """round_half_even(acc * mult) + zp, clamped, in exact rationals (Python's round)."""
    out = []
    shape = acc.shape
    acc = acc.reshape(shape[0], shape[1], -1)
    for n in range(shape[0]):
        for c in range(shape[1]):
            m = Fraction(float(mult[c]))
            out.extend(min(hi, max(lo, round(Fraction(int(a)) * m) + zp))
                       for a in acc[n, c].tolist())
    return torch.tensor(out).reshape(shape)


@settings(max_examples=25, deadline=None)
@given(c_in=st.integers(1, 4), c_out=st.integers(1, 4), k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), depthwise=st.booleans(), w_bits=st.sampled_from([2, 4, 8]),
       a_bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_bit_exact_conv_requantizes_as_exact_rationals(c_in, c_out, k, stride, depthwise,
                                                       w_bits, a_bits, seed):
    """One conv and its output grid: the simulation's codes are round(acc * M) with M the
    float32 s_x * s_w / s_out, acc the exact integer sum with the int32 bias."""
    torch.manual_seed(seed)
    c_out = c_in if depthwise else c_out
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2,
                     groups=c_in if depthwise else 1)
    model = nn.Sequential(conv)
    x = torch.randn(6, c_in, 5, 5)
    config = lowbit.QuantConfig.uniform(w_bits, a_bits, first_last="same")
    q = lowbit.prepare(model, config, x[:2])
    q, _ = insert_points(q)
    lowbit.calibrate(q, [x], progress=False)
    layer = q.get_submodule("0")
    outq = q.get_submodule("outq0")
    xq = layer.input_quant.integer_form(x)
    wf = layer.weight_quant.integer_form(layer.weight.detach())
    s_x = float(xq.scale.reshape(-1)[0])
    w_scale = wf.scale.reshape(-1).expand(c_out).float()
    acc_scale = (torch.tensor(s_x) * w_scale).float()  # float32, as onnxruntime forms it
    w_codes = (wf.codes.long() - wf.zero_point.long().reshape(-1, 1, 1, 1)).double()
    acc = nn.functional.conv2d((xq.codes.long() - xq.zero_point.long()).double(), w_codes, None,
                               conv.stride, conv.padding, 1, conv.groups).round().long()
    bias = torch.round(conv.bias.detach().double() / acc_scale.double()).long()
    acc = acc + bias.reshape(1, -1, 1, 1)
    s_out, z_out = outq.params()["scale"].reshape(()), int(outq.params()["zero_point"])
    mult = (acc_scale / s_out).float()
    want = _exact_codes(acc, mult, z_out, *outq.qrange)
    y = bit_exact(q)(x)
    got = outq.integer_form(y).codes.long()
    assert torch.equal(got, want)
    assert torch.equal(y, IntegerModel(q).run(x))


def test_bit_exact_refuses_an_uncalibrated_model():
    x = torch.randn(2, 3, 16, 16)
    raw = lowbit.prepare(Plain().eval(), CONFIGS["w8a8"](), x)
    with pytest.raises(lowbit.errors.CalibrationError, match="not calibrated"):
        bit_exact(raw)
