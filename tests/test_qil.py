"""QIL interval quantizers: the paper's transformer, finite edge gradients, ternary 2-bit
weights, the integer form, and equality with uniform quantization at initialisation."""

import pytest
import torch

from lowbit import QuantConfig, calibrate, prepare
from lowbit.errors import ConfigError
from lowbit.quant import QILQuantizer, QuantMode, UniformQuantizer
from lowbit.quant.qil import D_MIN


def _ready(q, x):
    q.mode = QuantMode.CALIBRATE
    q(x)
    q.finish_calibration()
    q.mode = QuantMode.QUANTIZE
    return q


def _weight_q(bits=4, gamma=1.0, learn=True, per_channel=False, c=0.3, d=0.2):
    q = _ready(QILQuantizer(bits=bits, signed=True, per_channel=per_channel, gamma=gamma,
                            learn_gamma=learn), torch.randn(8, 4, 3, 3))
    with torch.no_grad():
        q.c.fill_(c)
        q.d.fill_(d)
    return q


def paper_transformer(w, c, d, gamma):
    """Jung et al. (2019), eq. (3), written literally with Python branches per element."""
    alpha, beta = 0.5 / d, -0.5 * c / d + 0.5
    out = []
    for v in w.reshape(-1).tolist():
        a = abs(v)
        s = (v > 0) - (v < 0)
        if a < c - d:
            out.append(0.0)
        elif a > c + d:
            out.append(float(s))
        else:
            out.append(s * (alpha * a + beta) ** gamma)
    return torch.tensor(out).reshape(w.shape)


@pytest.mark.parametrize("gamma", [1.0, 0.6, 1.7])
def test_weight_transformer_matches_paper(gamma):
    q = _weight_q(gamma=gamma)
    w = torch.randn(64) * 0.4
    torch.testing.assert_close(q.transform(w), paper_transformer(w, 0.3, 0.2, gamma),
                               atol=1e-6, rtol=1e-5)
    # discretizer: round(T * q) / q with q = 2^(N-1) - 1, in units of c + d
    levels = 7
    expected = torch.round(paper_transformer(w, 0.3, 0.2, gamma) * levels) / levels * 0.5
    torch.testing.assert_close(q(w), expected, atol=1e-6, rtol=1e-5)


def test_activation_transformer_matches_paper():
    q = _ready(QILQuantizer(bits=3, signed=False), torch.rand(100) * 2)
    with torch.no_grad():
        q.c.fill_(0.8)
        q.d.fill_(0.5)
    x = torch.rand(200) * 2
    expected_t = ((0.5 / 0.5) * x + (-0.5 * 0.8 / 0.5 + 0.5)).clamp(0, 1)
    torch.testing.assert_close(q.transform(x), expected_t)
    assert q.levels == 7
    torch.testing.assert_close(q(x), torch.round(expected_t * 7) / 7 * 1.3)


def test_gradients_finite_at_interval_edges():
    q = _weight_q(bits=3, gamma=0.5, learn=True, c=0.3, d=0.2)
    w = torch.tensor([0.0, 0.1, -0.1, 0.5, -0.5, 0.05, 0.3, 0.7], requires_grad=True)
    q(w).pow(2).sum().backward()
    for t in (w.grad, q.c.grad, q.d.grad, q.gamma.grad):
        assert t is not None and torch.isfinite(t).all()
    assert q.gamma.grad.abs().sum() > 0
    a = _ready(QILQuantizer(bits=2, signed=False), torch.rand(10))
    with torch.no_grad():
        a.c.fill_(0.5)
        a.d.fill_(0.25)
    x = torch.tensor([0.0, 0.25, 0.75, 1.0, 0.5], requires_grad=True)
    a(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(a.c.grad).all()
    assert torch.isfinite(a.d.grad).all()


def test_gradients_zero_outside_interval():
    q = _weight_q(bits=4, gamma=1.0, learn=False)
    w = torch.tensor([0.05, 0.9, -0.9], requires_grad=True)  # pruned, clipped, clipped
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.zeros(3))


def test_two_bit_weights_are_ternary():
    q = _ready(QILQuantizer(bits=2, signed=True, learn_gamma=True), torch.randn(16, 8, 3, 3))
    vals = torch.unique(q(torch.randn(16, 8, 3, 3)))
    assert len(vals) == 3
    assert vals[1] == 0 and torch.isclose(vals[0], -vals[2])
    assert q.qrange == (-1, 1)


def test_fused_activation_path_matches_autograd_path():
    x = torch.relu(torch.randn(4, 6, 5, 5)).contiguous(memory_format=torch.channels_last)
    q = _ready(QILQuantizer(bits=4, signed=False), x)
    with torch.no_grad():
        q.c.fill_(0.9)
        q.d.fill_(0.7)
    weight = torch.randn_like(x)
    grads = []
    for fused in (True, False):
        q.fused = fused
        xi = x.clone().requires_grad_()
        q.c.grad = q.d.grad = None
        out = q(xi)
        (out * weight).sum().backward()
        grads.append((out.detach(), xi.grad, q.c.grad.clone(), q.d.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gamma,per_channel", [(1.0, False), (0.7, True)])
def test_integer_form_reproduces_forward(gamma, per_channel):
    q = _weight_q(bits=3, gamma=gamma, per_channel=per_channel)
    w = torch.randn(8, 4, 3, 3) * 0.3
    form = q.integer_form(w)
    assert form.codes.dtype == torch.int32
    assert int(form.codes.min()) >= -3 and int(form.codes.max()) <= 3
    assert torch.all(form.zero_point == 0)
    torch.testing.assert_close(form.dequantize(), q(w), atol=1e-6, rtol=1e-6)
    a = _ready(QILQuantizer(bits=4, signed=False), torch.rand(50))
    x = torch.rand(50)
    af = a.integer_form(x)
    assert int(af.codes.min()) >= 0 and int(af.codes.max()) <= 15
    torch.testing.assert_close(af.dequantize(), a(x))


@pytest.mark.parametrize("signed", [True, False])
def test_initialisation_equals_uniform_quantizer(signed):
    x = torch.randn(6, 4, 3, 3) if signed else torch.rand(6, 4, 3, 3)
    kw = dict(bits=4, signed=signed, per_channel=signed, observer="mse")
    qil = _ready(QILQuantizer(**kw), x)
    uni = _ready(UniformQuantizer(**kw, narrow_range=signed, symmetric=True), x)
    y = torch.randn(6, 4, 3, 3) if signed else torch.rand(6, 4, 3, 3)
    mismatch = (~torch.isclose(qil(y), uni(y), atol=1e-5)).float().mean()
    assert mismatch < 0.01
    torch.testing.assert_close(qil.c, qil.d)


def test_collapsed_interval_is_flagged_and_forward_stays_finite():
    q = _weight_q()
    assert not bool(q.collapsed())
    with torch.no_grad():
        q.d.fill_(-1.0)
    assert bool(q.collapsed())
    assert torch.isfinite(q(torch.randn(10))).all()
    assert D_MIN > 0


def test_state_dict_round_trip_keeps_gamma_and_bits():
    q = _weight_q(bits=3, gamma=0.8)
    q2 = QILQuantizer(bits=8, signed=True, learn_gamma=True)
    q2.load_state_dict(q.state_dict())
    q2.mode = QuantMode.QUANTIZE
    w = torch.randn(20)
    assert q2.bits == 3 and q2.calibrated
    torch.testing.assert_close(q2(w), q(w))


def test_config_builds_qil_in_a_model():
    from lowbit.qat import method_config

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 3))
    cfg = method_config("qil", 2, 2)
    cfg2 = QuantConfig.model_validate(cfg.to_dict())
    x = torch.randn(4, 3, 8, 8)
    q = prepare(model, cfg2, x)
    calibrate(q, [x], progress=False)
    mid = q.get_submodule("2")
    assert mid.weight_quant.kind == "qil" and mid.weight_quant.learn_gamma
    assert mid.input_quant.signed is False and not mid.input_quant.learn_gamma
    assert mid.w_bits == 2 and q.get_submodule("0").w_bits == 8
    assert torch.isfinite(q(x)).all()
    with pytest.raises(ConfigError):
        QILQuantizer(bits=4, gamma=0.0)


@pytest.mark.parametrize("gamma,learn,per_channel,grad_scale", [
    (1.0, False, False, True), (1.0, False, True, True), (0.7, True, True, True),
    (1.3, True, False, False), (1.0, True, True, True),
])
def test_fused_weight_path_matches_autograd_path(gamma, learn, per_channel, grad_scale):
    torch.manual_seed(0)
    w = (torch.randn(8, 4, 3, 3) * 0.3).contiguous(memory_format=torch.channels_last)
    q = _weight_q(bits=3, gamma=gamma, learn=learn, per_channel=per_channel)
    q.use_grad_scale = grad_scale
    with torch.no_grad():
        q.c.copy_(torch.linspace(0.1, 0.4, q.c.numel()))
        q.d.copy_(torch.linspace(0.3, 0.05, q.d.numel()))
    weight = torch.randn_like(w)
    grads = []
    for fused in (True, False):
        q.fused = fused
        wi = w.clone().requires_grad_()
        q.c.grad = q.d.grad = q.gamma.grad = None
        out = q(wi)
        (out * weight).sum().backward()
        g = q.gamma.grad.clone() if learn else torch.zeros(1)
        grads.append((out.detach(), wi.grad, q.c.grad.clone(), q.d.grad.clone(), g))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
