"""Power-of-two-aware rescaling of layer pairs: the float model is unchanged, the fit is better."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.config import QuantConfig
from lowbit.errors import ConfigError
from lowbit.models.mobilenetv2 import InvertedResidual, conv_bn_relu6
from lowbit.nn import ChannelClamp
from lowbit.prepare import calibrate, float_mode, prepare
from lowbit.ptq.pot_rescale import find_chains, relative_pot_error, rescale_pairs
from lowbit.ptq.rapq import with_kind
from lowbit.ptq.reconstruct import bn_targets


class TinyMBv2(nn.Module):
    """Stem, a residual block without expansion (its input is also read by the residual add, so
    it cannot be rescaled), a strided and a residual block with expansion: two dw chains."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu6(3, 8, 3, 2, tf_same_padding=True),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 3, tf_same_padding=True),
            InvertedResidual(12, 12, 1, 2),
        )
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class HiddenUse(nn.Module):
    """ReLU6 output read by the depthwise conv *and* by a functional add hooks cannot see."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU6()
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.act(self.conv(x))
        return self.head((self.dw(y) + y).mean((2, 3)))


def _model(cls=TinyMBv2):
    torch.manual_seed(0)
    return randomize_bn(cls()).eval()


def _data():
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _pot(model, x, per_channel=True):
    cfg = with_kind(QuantConfig.uniform(4, 4, dw_act_per_channel=per_channel), "pot", "mse",
                    {"rounding": "mse"})
    q = prepare(model, cfg, x[:2])
    return calibrate(q, [x[:24], x[24:]], progress=False)


def _float_out(q, x):
    with torch.no_grad(), float_mode(q):
        return q(x)


def test_chains_follow_the_tensors_through_pads_and_folded_bn():
    x = _data()
    q = _pot(_model(), x)
    chains, skipped = find_chains(q)
    got = [(c.producer, c.act, c.consumer) for c in chains]
    assert got == [("features.2.conv.0.0", "features.2.conv.0.2", "features.2.conv.1.0"),
                   ("features.3.conv.0.0", "features.3.conv.0.2", "features.3.conv.1.0")]
    assert list(skipped) == ["features.1.conv.0.0"]
    assert "features.0.2 is used by more than this layer" in skipped["features.1.conv.0.0"]
    assert all(c.depthwise for c in chains)


def test_rescaling_keeps_the_float_model_and_lowers_the_pot_error():
    x = _data()
    q = _pot(_model(), x)
    before = _float_out(q, x)
    dw_before = q.features[2].conv[1][0].weight.detach().clone()
    rep = rescale_pairs(q, x, grid=16)
    assert set(rep.rescaled) == {"features.2.conv.1.0", "features.3.conv.1.0"}
    torch.testing.assert_close(_float_out(q, x), before, rtol=1e-4, atol=1e-5)
    for r in rep.rescaled.values():
        assert r["error_after"] <= r["error_before"]
    assert any(r["error_after"] < r["error_before"] for r in rep.rescaled.values())
    clamp = q.features[2].conv[0][2]
    assert isinstance(clamp, ChannelClamp) and isinstance(q.features[0][2], nn.ReLU6)
    # the clamp bound is 6/f where f is what multiplied the depthwise weights
    f = (q.features[2].conv[1][0].weight.detach() / dw_before).flatten(1).mean(1)
    torch.testing.assert_close(clamp.upper * f, torch.full_like(f, 6.0))
    assert bool(((f >= 1) & (f < 2)).all())


def test_a_tensor_also_used_outside_modules_is_seen_by_the_graph_and_left_alone():
    x = _data()
    q = _pot(_model(HiddenUse), x)
    before = _float_out(q, x)
    w = q.dw.weight.detach().clone()
    rep = rescale_pairs(q, x)
    assert rep.rescaled == {} and "act is used by more than this layer" in rep.skipped["dw"]
    assert isinstance(q.act, nn.ReLU6) and torch.equal(q.dw.weight, w)
    assert torch.equal(_float_out(q, x), before)
    with pytest.raises(ConfigError, match="nothing to rescale"):
        lowbit.ptq(_model(HiddenUse), "rapq-quick", [x], QuantConfig.uniform(4, 4), x[:2],
                   quick_iters=0, pot_rescale=True, progress=False)


def test_per_tensor_depthwise_inputs_get_one_factor():
    x = _data()
    q = _pot(_model(), x, per_channel=False)
    rep = rescale_pairs(q, x)
    assert {r["factors"] for r in rep.rescaled.values()} == {"one"}
    upper = q.features[2].conv[0][2].upper
    assert torch.equal(upper, torch.full_like(upper, upper[0].item()))


def test_bad_options_are_refused():
    x = _data()
    with pytest.raises(ConfigError, match="'brecq' takes no option pot_rescale"):
        lowbit.ptq(_model(), "brecq", [x], QuantConfig.uniform(4, 4), x[:2], pot_rescale=True,
                   progress=False)
    with pytest.raises(ConfigError, match="pot_rescale must be"):
        lowbit.ptq(_model(), "rapq-quick", [x], QuantConfig.uniform(4, 4), x[:2],
                   pot_rescale="everything", progress=False)


def test_bn_targets_follow_the_producer():
    x = _data()
    model = _model()
    targets, _ = bn_targets(model, x[:2])
    key = "features.2.conv.0.0"
    mean0, std0 = targets[key].mean.clone(), targets[key].std.clone()
    q = _pot(model, x)
    w0 = q.get_submodule(key).weight.detach().clone()
    rescale_pairs(q, x, bn_targets=targets)
    f = (w0 / q.get_submodule(key).weight.detach()).flatten(1).mean(1)
    assert bool((f > 1).any())
    torch.testing.assert_close(targets[key].mean * f, mean0)
    torch.testing.assert_close(targets[key].std * f, std0)


def test_rapq_with_rescaling_saves_and_reloads_exactly(tmp_path):
    from lowbit.pipeline import load_quantized, save_quantized

    x = _data()
    model = _model()
    q = lowbit.ptq(model, "rapq-quick", [x[:24], x[24:]],
                   QuantConfig.uniform(4, 4, dw_act_per_channel=True), x[:2], quick_iters=2,
                   pot_rescale="depthwise", progress=False)
    assert len(q.lowbit_rapq["pot_rescale"]["rescaled"]) == 2
    save_quantized(q, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "meta.json").read_text())
    clamps = {t["module"] for t in meta["lowbit_transforms"] if t["op"] == "channel_clamp"}
    assert "features.2.conv.0.2" in clamps
    assert all(isinstance(q.get_submodule(m), ChannelClamp) for m in clamps)
    again = load_quantized(model, tmp_path / "q", x[:2])
    assert isinstance(again.features[2].conv[0][2], ChannelClamp)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    # a folder saved before swaps were recorded: the ChannelClamps are inferred from the state
    del meta["lowbit_transforms"]
    (tmp_path / "q" / "meta.json").write_text(json.dumps(meta))
    with torch.no_grad():
        assert torch.equal(load_quantized(model, tmp_path / "q", x[:2])(x), q(x))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1.0, 1.99), st.sampled_from([(-8, 7), (0, 15)]))
def test_relative_error_is_periodic_in_the_octave(seed, f, qrange):
    """Scaling by 2 moves every power-of-two grid onto another: the fit cannot change."""
    v = torch.randn(3, 40, generator=torch.Generator().manual_seed(seed))
    if qrange[0] == 0:
        v = v.abs()
    e = relative_pot_error(v, torch.tensor([f, 2 * f, f / 4]), *qrange)
    torch.testing.assert_close(e[:, 1], e[:, 0])
    torch.testing.assert_close(e[:, 2], e[:, 0])


def test_values_on_a_pot_grid_fit_exactly():
    v = torch.tensor([[-8.0, -3.0, 0.0, 5.0, 7.0]]) * 0.25
    assert relative_pot_error(v, torch.tensor([1.0]), -8, 7).item() == 0.0
    assert relative_pot_error(v, torch.tensor([1.3]), -8, 7).item() > 0.0


def test_cli_flag_reaches_rapq_and_is_refused_elsewhere(capsys, tmp_path):
    common = ["--calib-size", "32", "--eval-size", "32", "--quick-iters", "1", "--no-progress"]
    with pytest.raises(SystemExit):  # the removed mode 'all' is refused by argparse
        main(["ptq", "-m", "digits_cnn", "--method", "rapq-quick", "--pot-rescale", "all",
              "-o", str(tmp_path / "r.json"), *common])
    assert "invalid choice: 'all'" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    # the digits CNN has conv -> ReLU -> conv pairs but no depthwise conv
    rc = main(["ptq", "-m", "digits_cnn", "--method", "rapq-quick", "--pot-rescale", *common])
    assert rc == 2 and "nothing to rescale" in capsys.readouterr().err
    rc = main(["ptq", "-m", "digits_cnn", "--method", "mse", "--pot-rescale", "--no-progress"])
    assert rc == 2 and "--pot-rescale does not apply" in capsys.readouterr().err


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_channel_clamp_is_relu6_divided_per_channel_with_its_gradient(seed):
    """relu6(x * f) / f == clamp(x, 0, 6 / f), and the gradient passes exactly inside (0, 6/f)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(5, generator=g) * 3 + 0.25
    x = (torch.randn(2, 5, 4, 3, generator=g) * 4).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = ChannelClamp(6.0 / f)(x)
    fb = f.reshape(1, -1, 1, 1)
    assert torch.allclose(y, nn.functional.relu6(x.detach() * fb) / fb, atol=1e-6)
    w = torch.randn(y.shape, generator=g)
    (y * w).sum().backward()
    inside = (x.detach() > 0) & (x.detach() < 6.0 / fb)
    assert torch.equal(x.grad, torch.where(inside, w, torch.zeros_like(w)))
