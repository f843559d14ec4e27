"""The strategy mixture (DQSS's alpha/beta) and its efficient convolution."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit import ConfigError, calibrate
from lowbit.nn.layers import QConv2d
from lowbit.quant import (
    LSQQuantizer,
    MixtureQuantizer,
    UniformQuantizer,
    mixture_like,
    strategy_fields,
)

W_NAMES = ["mse", "lsq", "qil"]
A_NAMES = ["percentile", "lsq", "pact"]


def mixed_conv(seed=0):
    """A 3x3 conv whose weight and input are both 3-way mixtures, calibrated, random logits."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    wq = LSQQuantizer(bits=4, signed=True, per_channel=True, narrow_range=True)
    aq = UniformQuantizer(bits=3, signed=None, symmetric=True)
    layer = QConv2d.from_float(conv, mixture_like(wq, W_NAMES, "minmax"),
                               mixture_like(aq, A_NAMES, "minmax"))
    x = torch.randn(6, 3, 5, 5, generator=g).relu()
    calibrate(layer, [x], progress=False)
    with torch.no_grad():
        layer.weight_quant.logits.copy_(torch.randn(3, generator=g))
        layer.input_quant.logits.copy_(torch.randn(3, generator=g))
        # calibrated on one small batch, the candidates start nearly equal; identical
        # outputs would give the logits no gradient at all
        layer.input_quant.candidates[1].scale.mul_(1.3)
        layer.input_quant.candidates[2].alpha.mul_(0.7)
    return layer, x


def test_efficient_conv_equals_the_pairwise_darts_sum():
    layer, x = mixed_conv()
    wm, am = layer.weight_quant, layer.input_quant
    a, b = wm.probabilities(), am.probabilities()
    pairwise = sum(
        a[i] * b[j] * F.conv2d(qa.quantize(x), qw.quantize(layer.weight), layer.bias, padding=1)
        for i, qw in enumerate(wm.candidates) for j, qa in enumerate(am.candidates)
    )
    # the bias enters every pair with weight a_i b_j, which sums to one
    assert torch.allclose(layer(x), pairwise, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1),
                              atol=1e-3)


@pytest.mark.parametrize("i", range(3))
def test_one_hot_logits_equal_that_candidate_exactly(i):
    layer, x = mixed_conv(seed=i)
    for mix, t in ((layer.weight_quant, layer.weight), (layer.input_quant, x)):
        with torch.no_grad():
            mix.logits.copy_(torch.nn.functional.one_hot(torch.tensor(i), 3).float() * 1e4)
        assert torch.equal(mix(t), mix.candidates[i].quantize(t))
        assert mix.argmax() == i and mix.chosen() is mix.candidates[i]
        mix.logits.data.zero_()
        mix.choice = i  # the discrete result: exactly that candidate, whatever the logits
        assert torch.equal(mix(t), mix.candidates[i].quantize(t))


def test_gradients_reach_the_logits_and_every_candidates_parameters():
    layer, x = mixed_conv()
    layer(x).square().sum().backward()
    wm, am = layer.weight_quant, layer.input_quant
    for mix in (wm, am):
        assert mix.logits.grad is not None and bool((mix.logits.grad != 0).all())
    own = [wm.candidates[1].scale, wm.candidates[2].c, wm.candidates[2].d,
           am.candidates[1].scale, am.candidates[2].alpha]
    for p in own:
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    assert layer.weight.grad is not None


@pytest.mark.parametrize("channels_last", [False, True])
def test_mixture_gradients_equal_the_autograd_sum(channels_last):
    """The fused weighted sum gives the same gradients (input, logits, every candidate's own
    parameters) as ``sum_i p_i * Q_i(x)`` written out."""
    layer, x = mixed_conv()
    mix = layer.input_quant
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(3)) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(x.shape)
    params = [mix.logits, *(p for c in mix.candidates for p in c.parameters() if p.requires_grad)]

    def grads(fn):
        xx = x.clone().requires_grad_()
        return torch.autograd.grad((fn(xx) * w).sum(), [xx, *params])

    def explicit(xx):
        p = mix.probabilities()
        return sum(p[i] * c.quantize(xx) for i, c in enumerate(mix.candidates))

    for a, b in zip(grads(mix.quantize), grads(explicit), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_temperature_sharpens_the_mixture():
    layer, _ = mixed_conv()
    mix = layer.weight_quant
    soft = mix.probabilities().max()
    mix.set_temperature(0.05)
    assert mix.probabilities().max() > soft
    with pytest.raises(ConfigError, match="temperature must be positive"):
        mix.set_temperature(0)


def test_bad_candidates_are_clear_errors():
    wq = LSQQuantizer(bits=4, signed=True, per_channel=True)
    with pytest.raises(ConfigError, match="at least one candidate"):
        mixture_like(wq, [], "minmax")
    with pytest.raises(ConfigError, match="unknown quantization strategy"):
        mixture_like(wq, ["mse", "nonsense"], "minmax")
    binary = LSQQuantizer(bits=1, signed=True)
    with pytest.raises(ConfigError, match="'mse' cannot represent 1 bits"):
        mixture_like(binary, ["lsq", "mse"], "minmax")
    with pytest.raises(ConfigError, match="signedness"):
        MixtureQuantizer([LSQQuantizer(bits=4, signed=True), LSQQuantizer(bits=4, signed=False)],
                         ["a", "b"])
    with pytest.raises(ConfigError, match="per-channel layout"):
        MixtureQuantizer([LSQQuantizer(bits=4, per_channel=True), UniformQuantizer(bits=4)])
    with pytest.raises(ConfigError, match="bit-width"):
        MixtureQuantizer([LSQQuantizer(bits=4), UniformQuantizer(bits=3)])
    with pytest.raises(ConfigError, match="distinct name"):
        MixtureQuantizer([LSQQuantizer(bits=4), LSQQuantizer(bits=4)])
    layer, _ = mixed_conv()
    with pytest.raises(ConfigError, match="no single scale"):
        layer.weight_quant.scale_zero_point()


def test_strategy_names():
    assert strategy_fields("mse", "minmax") == {"kind": "uniform", "observer": "mse"}
    assert strategy_fields("lsq", "mse") == {"kind": "lsq", "observer": "mse"}
    assert strategy_fields("pact:percentile", "mse") == {"kind": "pact", "observer": "percentile"}
    with pytest.raises(ConfigError, match="unknown observer"):
        strategy_fields("lsq:oops", "mse")


@settings(max_examples=20, deadline=None)
@given(logits=st.lists(st.floats(-5, 5), min_size=3, max_size=3),
       temperature=st.floats(0.05, 5.0), seed=st.integers(0, 2**16))
def test_the_mixture_is_a_convex_combination_of_its_candidates(logits, temperature, seed):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed)).relu()
    aq = UniformQuantizer(bits=3, signed=None, symmetric=True)
    mix = mixture_like(aq, A_NAMES, "minmax", temperature=temperature)
    calibrate(mix, [x], progress=False)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor(logits))
    outs = torch.stack([c.quantize(x) for c in mix.candidates])
    with torch.no_grad():
        y, p = mix(x), mix.probabilities()
    assert abs(float(p.sum()) - 1) < 1e-5 and bool((p >= 0).all())
    assert bool((y >= outs.min(0).values - 1e-5).all() & (y <= outs.max(0).values + 1e-5).all())
    assert torch.allclose(y, (p.view(-1, 1, 1, 1, 1) * outs).sum(0), atol=1e-5)
