"""Power-of-two-aware rescaling of linear (residual) streams: found on the fx graph, the float
model unchanged, the readers' grids fitted better."""

from __future__ import annotations

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
from lowbit.prepare import calibrate, float_mode, prepare
from lowbit.ptq.rapq import with_kind
from lowbit.ptq.reconstruct import bn_targets
from lowbit.ptq.stream_rescale import asymmetric_pot_error, find_streams, rescale_streams

PRODUCERS = ["features.1.conv.2", "features.2.conv.2"]
READERS = ["features.2.conv.0.0", "features.3.0"]


class StreamNet(nn.Module):
    """Stem, a strided and a residual inverted block (their projections and the sum form one
    linear stream), then a 1x1 conv head that reads the stream: one stream, two readers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu6(3, 8, 3, 2),
            InvertedResidual(8, 12, 2, 3),
            InvertedResidual(12, 12, 1, 2),
            conv_bn_relu6(12, 16, 1),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class PooledStream(StreamNet):
    """The same stream read by pooling instead of a conv: it must be left alone."""

    def forward(self, x):
        y = self.features[2](self.features[1](self.features[0](x)))
        return self.head(self.features[3](y).mean((2, 3)) + y.mean((2, 3)).repeat(1, 2)[:, :16])


class ReluAfterAdd(nn.Module):
    """ResNet style: the sum goes through a ReLU, so the stream is not linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.relu(y + self.b(y)))


def _model(cls=StreamNet):
    torch.manual_seed(0)
    return randomize_bn(cls()).eval()


def _data():
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _pot(model, x):
    cfg = with_kind(QuantConfig.uniform(4, 4), "pot", "mse", {"rounding": "mse"})
    q = prepare(model, cfg, x[:2])
    return calibrate(q, [x[:24], x[24:]], progress=False)


def _float_out(q, x):
    with torch.no_grad(), float_mode(q):
        return q(x)


def test_the_stream_and_its_readers_are_found():
    x = _data()
    streams, skipped = find_streams(_pot(_model(), x))
    assert [(s.producers, s.readers) for s in streams] == [(PRODUCERS, READERS)]
    assert skipped == {}


def test_streams_read_by_other_things_are_left_alone():
    x = _data()
    streams, skipped = find_streams(_pot(_model(PooledStream), x))
    assert streams == [] and "is not a quantized layer" in skipped["features.1.conv.2"]
    streams, skipped = find_streams(_pot(_model(ReluAfterAdd), x))
    assert streams == [] and "not a layer output or a sum" in skipped["b"]


def test_rescaling_keeps_the_float_model_and_scales_producers_and_readers_alike():
    x = _data()
    model = _model()
    targets, _ = bn_targets(model, x[:2])
    q = _pot(model, x)
    before = _float_out(q, x)
    weights = {n: q.get_submodule(n).weight.detach().clone() for n in PRODUCERS + READERS}
    mean0 = targets[PRODUCERS[0]].mean.clone()
    rep = rescale_streams(q, x, grid=16, bn_targets=targets)
    r = rep.rescaled["stream:features.1.conv.2"]
    torch.testing.assert_close(_float_out(q, x), before, rtol=1e-4, atol=1e-5)
    assert r["error_after"] <= r["error_before"] and 1.0 <= r["factor_min"] < 2.0
    a = r["factor_min"]
    for n in PRODUCERS:
        torch.testing.assert_close(q.get_submodule(n).weight, weights[n] * a)
    for n in READERS:
        torch.testing.assert_close(q.get_submodule(n).weight, weights[n] / a)
    torch.testing.assert_close(targets[PRODUCERS[0]].mean, mean0 * a)


def test_rapq_joins_streams_and_pairs_and_refuses_bad_modes(tmp_path):
    from lowbit.pipeline import load_quantized, save_quantized

    x = _data()
    model = _model()
    cfg = QuantConfig.uniform(4, 4, dw_act_per_channel=True)
    q = lowbit.ptq(model, "rapq-quick", [x[:24], x[24:]], cfg, x[:2], quick_iters=2,
                   pot_rescale="depthwise+streams", progress=False)
    rep = q.lowbit_rapq["pot_rescale"]
    assert rep["mode"] == "depthwise+streams"
    assert "stream:features.1.conv.2" in rep["rescaled"] and "features.2.conv.1.0" in rep["rescaled"]
    save_quantized(q, tmp_path / "q")
    again = load_quantized(model, tmp_path / "q", x[:2])
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    for bad in ("streams+streams", "depthwise+all", "stream"):
        with pytest.raises(ConfigError, match="pot_rescale must be"):
            lowbit.ptq(model, "rapq-quick", [x], cfg, x[:2], pot_rescale=bad, progress=False)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1.0, 1.99), st.sampled_from([(-8, 7), (0, 15)]))
def test_asymmetric_error_is_periodic_in_the_octave(seed, f, qrange):
    """Scaling by 2 moves every power-of-two grid onto another: the fit cannot change."""
    v = torch.randn(200, generator=torch.Generator().manual_seed(seed)) + 0.5
    e = asymmetric_pot_error(v, torch.tensor([f, 2 * f, f / 4]), *qrange)
    torch.testing.assert_close(e[1], e[0])
    torch.testing.assert_close(e[2], e[0])


def test_values_on_an_asymmetric_grid_fit_exactly():
    v = (torch.arange(0, 16.0) - 5) * 0.5  # codes 0..15, zero-point 5, step 2**-1
    assert asymmetric_pot_error(v, torch.tensor([1.0]), 0, 15).item() == 0.0
    assert asymmetric_pot_error(v, torch.tensor([1.3]), 0, 15).item() > 0.0


def test_cli_flag_reaches_the_stream_rescaling(capsys):
    common = ["--calib-size", "32", "--eval-size", "32", "--quick-iters", "1", "--no-progress"]
    # the digits CNN's convs are all followed by ReLUs: no linear stream
    rc = main(["ptq", "-m", "digits_cnn", "--method", "rapq-quick", "--pot-rescale", "streams",
               *common])
    assert rc == 2 and "linear streams" in capsys.readouterr().err


class DataDependent(StreamNet):
    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace a branch on data
            x = -x
        return super().forward(x)


def test_an_untraceable_model_is_reported_not_rescaled():
    x = _data()
    streams, skipped = find_streams(_pot(_model(DataDependent), x))
    assert streams == [] and "torch.fx cannot trace it" in skipped["(model)"]
