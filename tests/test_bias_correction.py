"""Empirical bias correction: output means re-centred layer by layer, from every PTQ method."""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.cli import main
from lowbit.prepare import float_mode
from lowbit.ptq.bias_correction import correct_bias, float_output_means
from tests.helpers import randomize_bn


class DepthwiseNet(nn.Module):
    """Depthwise + 1x1 projection, the layers whose 2-bit rounding error is mostly a mean shift."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = self.bn2(self.pw(torch.relu(self.bn1(self.dw(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    return randomize_bn(DepthwiseNet()), torch.randn(64, 3, 8, 8)


def batches(x, bs=16):
    return [(x[i:i + bs], torch.zeros(len(x[i:i + bs]))) for i in range(0, len(x), bs)]


def layer_means(q, x, quantized=True):
    means = {}
    hooks = [m.register_forward_hook(
        lambda mod, i, o, n=n: means.__setitem__(n, o.float().mean([0, 2, 3]) if o.dim() == 4
                                                 else o.float().mean(0)))
        for n, m in q.named_modules() if n in ("stem", "dw", "pw", "fc")]
    with torch.no_grad():
        if quantized:
            q(x)
        else:
            with float_mode(q):
                q(x)
    for h in hooks:
        h.remove()
    return means


def test_every_layer_mean_matches_float_after_correction(setup):
    model, x = setup
    cfg = QuantConfig.uniform(2, None)  # weight-only: the mean shift is the weights' alone
    q = lowbit.ptq(model, "minmax", batches(x), cfg, x[:2], progress=False)
    ref = float_output_means(q, x)
    before = layer_means(q, x)
    shift = max((before[n] - ref[n]).abs().max().item() for n in ("dw", "pw"))
    assert shift > 1e-2, "2-bit depthwise weights must shift the output mean for this test"
    report = correct_bias(q, x, ref)
    after = layer_means(q, x)
    for name in ("stem", "dw", "pw", "fc"):
        torch.testing.assert_close(after[name], ref[name], atol=1e-4, rtol=1e-4)
    assert report["layers"] == 4 and not report["skipped_no_bias"]
    assert report["mean_abs_shift"]["dw"] > 0


def test_correction_lowers_output_error_and_keeps_float_reference(setup):
    model, x = setup
    cfg = QuantConfig.uniform(2, 8)
    plain = lowbit.ptq(model, "mse", batches(x), cfg, x[:2], progress=False)
    bc = lowbit.ptq(model, "mse", batches(x), cfg, x[:2], progress=False, bias_correction=True)
    with torch.no_grad():
        ref = model(x)
        err = [((m(x) - ref) ** 2).sum(1).mean().item() for m in (plain, bc)]
    assert err[1] < err[0]
    assert bc.lowbit_bias_correction["layers"] == 4
    assert model.stem.bias is None, "the float model is never modified"


def test_rapq_methods_take_bias_correction(setup):
    model, x = setup
    q = lowbit.ptq(model, "pot", batches(x), QuantConfig.uniform(2, 8), x[:2], progress=False,
                   bias_correction=True)
    info = q.lowbit_rapq["bias_correction"]
    assert info["layers"] == 4 and q.lowbit_rapq["seconds_bias_correction"] >= 0
    pot = [m for m in q.modules() if isinstance(m, lowbit.quant.PoTQuantizer)]
    assert pot and all(m.exponent.dtype == torch.int32 for m in pot), "scales stay 2^k"


def test_layers_without_bias_are_reported_not_changed(setup):
    model, x = setup
    cfg = QuantConfig.uniform(4, None).model_copy(update={"fold_bn": False})
    q = lowbit.prepare(model, cfg, x[:2])
    lowbit.calibrate(q, batches(x), progress=False)
    report = correct_bias(q, x, float_output_means(q, x))
    assert set(report["skipped_no_bias"]) == {"stem", "dw", "pw"}
    assert q.stem.bias is None


def test_cli_flag_saves_corrected_biases(tmp_path, capsys):
    """The corrected biases are part of the saved model: reloading gives the same accuracy."""
    saved = tmp_path / "q"
    args = ["ptq", "-m", "digits_cnn", "--method", "minmax", "--w-bits", "2", "--a-bits", "8",
            "--calib-size", "64", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "plain.json")]) == 0
    assert main([*args, "--bias-correction", "-o", str(tmp_path / "bc.json"),
                 "--save", str(saved)]) == 0
    plain, bc = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "bc.json"))
    assert bc["quantized"]["top1"] != plain["quantized"]["top1"], "the flag must change the model"
    assert main(["eval", "-m", "digits_cnn", "--quantized", str(saved), "--no-progress",
                 "-o", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["top1"] == pytest.approx(bc["quantized"]["top1"])
