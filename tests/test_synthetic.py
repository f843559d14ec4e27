"""Diversified reconstruction inputs (lowbit.ptq.synthetic) and rapq's ``diversify`` option."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.errors import ConfigError
from lowbit.ptq.reconstruct import bn_targets
from lowbit.ptq.synthetic import diversify
from tests.test_rapq import Net, batches, trained_like_bn

FAST = dict(iters=30, progress=False)


def narrow_net(x):
    """A BN-trained tiny classifier whose head sends (almost) every input to class 0."""
    torch.manual_seed(0)
    model = trained_like_bn(Net(), x)
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([2.0, 0, 0, 0, 0]))
    return model


@pytest.fixture(scope="module")
def narrow():
    torch.manual_seed(1)
    x = torch.randn(64, 3, 8, 8)
    return narrow_net(x), x


def bn_mismatch(q, targets, x):
    """The BN term's value on ``x``: batch statistics of the matched layers against targets."""
    total = []

    def hook(mod, inputs, out):
        t = tgt[mod]
        dims = [0, 2, 3]
        total.append(((out.mean(dims) - t.mean) ** 2).sum()
                     + ((out.std(dims, unbiased=False) - t.std) ** 2).sum())

    tgt = {q.get_submodule(k): v for k, v in targets.items()}
    hs = [m.register_forward_hook(hook) for m in tgt]
    with torch.no_grad(), lowbit.float_mode(q):
        q(x)
    for h in hs:
        h.remove()
    return float(sum(total))


def test_diversify_spreads_the_replaced_share_over_the_classes(narrow):
    model, x = narrow
    q = lowbit.prepare(model, QuantConfig.uniform(4, 4), x[:2])
    lowbit.calibrate(q, batches(x), progress=False)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.no_grad():
        assert model(x).argmax(1).unique().numel() == 1  # one class: narrow
    out = diversify(q, x, share=0.5, steps=40, seed=0)
    assert out.shape == x.shape and torch.equal(out[:32], x[:32])
    assert not torch.equal(out[32:], x[32:])
    with torch.no_grad():
        assert model(out[32:]).argmax(1).unique().numel() >= 3  # of the 5 classes
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items()), "model unchanged"
    assert all(p.requires_grad for p in q.parameters())
    assert torch.equal(out, diversify(q, x, share=0.5, steps=40, seed=0)), "deterministic"
    assert diversify(q, x, share=0.0, steps=40) is x
    assert diversify(q, x, share=0.5, steps=0) is x


def test_diversify_matches_bn_statistics_where_the_model_has_them(narrow):
    model, x = narrow
    q = lowbit.prepare(model, QuantConfig.uniform(4, 4), x[:2])
    lowbit.calibrate(q, batches(x), progress=False)
    targets, _ = bn_targets(model, x[:2])
    assert targets
    plain = diversify(q, x, share=1.0, steps=40)
    guided = diversify(q, x, targets, share=1.0, steps=40)
    assert bn_mismatch(q, targets, guided) < bn_mismatch(q, targets, plain)


def test_diversify_leaves_non_classifiers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())  # a feature map, no classes
    x = torch.randn(16, 3, 6, 6)
    q = lowbit.prepare(model, QuantConfig.uniform(8, 8), x[:2])
    lowbit.calibrate(q, [x], progress=False)
    assert diversify(q, x, share=0.5, steps=5) is x


def test_rapq_diversifies_narrow_calibration_only_in_auto(narrow):
    model, x = narrow
    cfg = QuantConfig.uniform(4, 4)
    with pytest.warns(lowbit.errors.NarrowCalibrationWarning):
        q = lowbit.ptq(model, "rapq", batches(x), cfg, x[:2], diversify_steps=5, **FAST)
    info = q.lowbit_rapq["diversify"]
    assert info["mode"] == "auto" and info["applied"] and info["bn_targets"] == 3
    q = lowbit.ptq(model, "brecq", batches(x), cfg, x[:2], diversify="off", **FAST)
    assert q.lowbit_rapq["diversify"] == {"mode": "off", "applied": False}
    torch.manual_seed(0)
    wide = trained_like_bn(Net(), x)
    with torch.no_grad():  # a head centred on the images' features: they reach its classes
        feats = wide.block(torch.relu(wide.bn(wide.stem(x)))).mean((2, 3))
        wide.fc.weight.mul_(20)
        wide.fc.bias.copy_(-wide.fc.weight @ feats.mean(0))
    q = lowbit.ptq(wide, "rapq", batches(x), cfg, x[:2], **FAST)
    assert not q.lowbit_report.calib_coverage.narrow
    assert q.lowbit_rapq["diversify"] == {"mode": "auto", "applied": False}
    forced = lowbit.ptq(wide, "rapq", batches(x), cfg, x[:2], diversify="on",
                        diversify_steps=3, **FAST)
    assert forced.lowbit_rapq["diversify"]["applied"]


def test_diversify_options_are_checked(narrow):
    model, x = narrow
    with pytest.raises(ConfigError, match="diversify"):
        lowbit.ptq(model, "rapq", batches(x), QuantConfig.uniform(4, 4), diversify="always")
    with pytest.raises(ConfigError, match="diversify_share"):
        lowbit.ptq(model, "rapq", batches(x), QuantConfig.uniform(4, 4), diversify_share=1.5)
