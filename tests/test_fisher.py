"""The fisher reconstruction objective: output sensitivities and their use."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.errors import ConfigError
from lowbit.ptq.fisher import output_sensitivities
from lowbit.ptq.reconstruct import ReconOptions


class Tiny(nn.Module):
    """conv -> ReLU -> conv -> pool -> fc; the second conv never reads channel 0."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        with torch.no_grad():
            self.b.weight[:, 0] = 0

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


class Twice(Tiny):
    def forward(self, x):
        return self.fc(self.b(self.b(torch.relu(self.a(x)))).mean((2, 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny().eval(), torch.randn(20, 3, 6, 6)


def test_weights_have_mean_one_and_follow_the_gradient(tiny):
    model, x = tiny
    sens = output_sensitivities(model, ["a", "b", "fc"], x, chunk=7)
    assert set(sens) == {"a", "b", "fc"}
    for name, s in sens.items():
        w = s.weights(slice(None))
        assert w.shape == (20, 4, 6, 6) if name in "ab" else w.shape == (20, 5)
        assert abs(w.mean().item() - 1.0) < 1e-2
        assert (w > 0).all()
    # channel 0 of a's output never reaches the prediction: its weight is the floor 1/norm
    wa = sens["a"].weights(slice(None))
    assert torch.allclose(wa[:, 0], torch.full_like(wa[:, 0], 1 / sens["a"].norm))
    assert wa[:, 1:].mean() > wa[:, 0].mean()
    # the fc output's weight follows |softmax - onehot(top class)|, the cross-entropy gradient
    with torch.no_grad():
        logits = model(x)
    g = (logits.softmax(1) - F.one_hot(logits.argmax(1), 5)).abs()
    r = g / g.pow(2).mean().sqrt()
    expect = (1 + r).pow(2) / (2 + 2 * r.mean())
    assert torch.allclose(sens["fc"].weights(slice(None)), expect, rtol=2e-2, atol=1e-3)


def test_parameters_keep_their_requires_grad(tiny):
    model, x = tiny
    model.fc.weight.requires_grad_(False)
    output_sensitivities(model, ["a", "b"], x)
    assert not model.fc.weight.requires_grad and model.a.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_non_classifier_and_repeated_unit_are_errors(tiny):
    model, x = tiny
    with pytest.raises(ConfigError, match="logits"):
        output_sensitivities(nn.Sequential(model.a), ["0"], x)
    with pytest.raises(ConfigError, match="called once"):
        output_sensitivities(Twice().eval(), ["a", "b"], x)


def test_unknown_objective_is_an_error():
    with pytest.raises(ConfigError, match="objective"):
        ReconOptions(objective="kl").check()


def test_rapq_with_fisher_objective_reduces_weighted_unit_errors(tiny):
    model, x = tiny
    cfg = QuantConfig.uniform(4, 4, first_last="same")
    q = lowbit.ptq(model, "rapq", [(x, torch.zeros(20))], cfg, x[:2], iters=40,
                   objective="fisher", progress=False)
    info = q.lowbit_rapq
    assert info["objective"] == "fisher" and info["seconds_sensitivity"] > 0
    for u in info["units"]:
        assert u["error_after"] <= u["error_before"] + 1e-6
