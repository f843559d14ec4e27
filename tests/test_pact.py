"""PACT: learned clipping with the paper's straight-through gradients."""

import pytest
import torch
from helpers import calibrated
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import ConfigError, QuantizerSpec
from lowbit.quant import PACTQuantizer, quantizer_class


def test_registered_and_built_from_a_config():
    assert quantizer_class("pact") is PACTQuantizer
    q = QuantizerSpec(kind="pact", bits=3, signed=False).build()
    assert isinstance(q, PACTQuantizer) and q.qrange == (0, 7)
    assert QuantizerSpec(kind="pact", bits=3, signed=True).build().qrange == (-3, 3)


def test_asymmetric_and_binary_are_refused():
    with pytest.raises(ConfigError, match="symmetric=True"):
        PACTQuantizer(bits=4, symmetric=False)
    with pytest.raises(ConfigError, match="at least 2 bits"):
        PACTQuantizer(bits=1, signed=True)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_output_grid_and_integer_form(bits, signed, seed):
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 2
    q = calibrated(PACTQuantizer, x if signed else x.relu(), bits=bits, signed=signed)
    alpha = float(q.alpha.detach())
    y = q(x * 1.5).detach()
    lo = -alpha if signed else 0.0
    assert float(y.min()) >= lo - 1e-6 and float(y.max()) <= alpha + 1e-6
    form = q.integer_form(x * 1.5)
    assert torch.equal(form.dequantize(), y)
    assert int(form.zero_point.abs().max()) == 0


def test_gradients_are_the_papers():
    q = calibrated(PACTQuantizer, torch.tensor([0.0, 2.0]), bits=2, signed=False)
    q.load_params({"alpha": torch.tensor([1.5])})
    x = torch.tensor([-1.0, 0.4, 1.0, 1.6, 3.0], requires_grad=True)
    q(x).sum().backward()
    # inside [0, alpha): straight through; clipped: 0 for x, 1 for alpha (at the top)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert q.alpha.grad.tolist() == [2.0]
    s = calibrated(PACTQuantizer, torch.tensor([-2.0, 2.0]), bits=3, signed=True)
    s.load_params({"alpha": torch.tensor([1.0])})
    x = torch.tensor([-3.0, -0.5, 0.5, 2.0], requires_grad=True)
    s(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert s.alpha.grad.tolist() == [0.0]  # one clipped at each end


@pytest.mark.parametrize("signed", [False, True])
def test_gradients_equal_the_mask_formulas_at_the_edges(signed):
    """The saved-``u`` backward against PACT's masks written out, on values that hit the
    edges exactly (0, the clip level, -clip level)."""
    g = torch.Generator().manual_seed(1)
    q = calibrated(PACTQuantizer, torch.tensor([-2.0, 2.0]) if signed else torch.tensor([0.0, 2.0]),
                   bits=3, signed=signed)
    q.load_params({"alpha": torch.tensor([1.5])})
    x = torch.cat([torch.randn(200, generator=g) * 2, torch.tensor([0.0, -0.0, 1.5, -1.5])])
    x = x.relu() if not signed else x
    x.requires_grad_()
    w = torch.randn(x.shape, generator=g)
    (q(x) * w).sum().backward()
    qmin, qmax = q.qrange
    u = x.detach() / (1.5 / qmax)
    top, bottom = u >= qmax, (u <= qmin if signed else u < 0)
    assert torch.equal(x.grad, w * ~(top | bottom))
    expect = (w * top).sum() - ((w * bottom).sum() if signed else 0)
    assert torch.allclose(q.alpha.grad, expect.reshape(1), atol=1e-5)


def test_scale_alone_sets_alpha():
    q = PACTQuantizer(bits=4, signed=False)
    q.load_params({"scale": torch.tensor([0.1])})
    assert torch.allclose(q.params()["alpha"], torch.tensor([1.5]))
