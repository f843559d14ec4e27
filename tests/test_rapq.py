"""RAPQ and the float-scale reconstruction on tiny models: invariants, errors, determinism."""

import json
import logging

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.cli import main
from lowbit.errors import CalibrationError, ConfigError
from lowbit.prepare import quant_layers, quantizers
from lowbit.ptq import PTQ_METHODS
from lowbit.ptq.blocks import find_units
from lowbit.ptq.rapq import rapq
from lowbit.ptq.reconstruct import ReconOptions, reconstruct_unit
from lowbit.quant import PoTQuantizer, UniformQuantizer
from tests.helpers import randomize_bn

FAST = dict(iters=60, quick_iters=40, progress=False)


class Block(nn.Module):
    """A residual block, so reconstruction has a real multi-layer unit."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = Block(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def trained_like_bn(model, x):
    """BN statistics measured on ``x`` (as training would leave them), affine randomised."""
    randomize_bn(model)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x = torch.randn(48, 3, 8, 8)
    model = trained_like_bn(Net(), x)
    return model, x


def batches(x, bs=16):
    return [(x[i:i + bs], torch.zeros(len(x[i:i + bs]))) for i in range(0, len(x), bs)]


def out_error(q, model, x):
    with torch.no_grad():
        return ((q(x) - model(x)) ** 2).sum(1).mean().item()


def test_methods_registered_and_units_found(setup):
    model, x = setup
    assert {"pot", "rapq-quick", "rapq", "brecq"} <= set(PTQ_METHODS)
    q = lowbit.prepare(model, QuantConfig.uniform(4, 4), x[:2])
    assert find_units(q) == ["stem", "block", "fc"]  # the residual block, read from the graph
    assert find_units(q, (Block,)) == ["stem", "block", "fc"]


def test_rapq_exports_exact_pow2_and_integer_zero_points(setup):
    model, x = setup
    q = rapq(model, batches(x), 2, 4, example_inputs=x[:2], **FAST)
    pots = [m for m in q.modules() if isinstance(m, PoTQuantizer)]
    assert pots and all(m.exponent.dtype == torch.int32 for m in pots)
    for m in pots:
        scale, zp = m.scale_zero_point()
        mantissa, exp = torch.frexp(scale)
        assert (mantissa == 0.5).all() and torch.equal(exp - 1, m.exponent)
        assert torch.equal(zp, torch.round(zp))
    for _, layer in quant_layers(q):
        form = layer.weight_quant.integer_form(layer.weight)
        assert form.zero_point.dtype == torch.int32
        assert torch.equal(form.dequantize(), layer.weight_quant(layer.weight))
    assert not [n for n, p in q.named_parameters() if "log2" in n], "no relaxed state is left"


def naive_and_quick(model, x, quick_iters):
    """The same model quantized by naive PoT and by RAPQ quick mode at W4A4."""
    cfg = QuantConfig.uniform(4, 4)
    naive = lowbit.ptq(model, "pot", batches(x), cfg, x[:2], progress=False)
    quick = lowbit.ptq(model, "rapq-quick", batches(x), cfg, x[:2], quick_iters=quick_iters,
                       progress=False)
    return naive, quick


def test_quick_never_worse_than_naive_pot(setup):
    model, x = setup
    naive, quick = naive_and_quick(model, x, quick_iters=40)
    info = quick.lowbit_rapq["quick"]
    assert info["adjusted_error"] <= info["naive_error"]
    assert out_error(quick, model, x) <= out_error(naive, model, x) + 1e-9


def test_reconstruction_reduces_block_output_error(setup):
    model, x = setup
    q = lowbit.ptq(model, "pot", batches(x), QuantConfig.uniform(2, 4), x[:2], progress=False)
    unit = q.block
    with torch.no_grad():
        inp = torch.relu(q.bn(q.stem(x)))
        with lowbit.float_mode(q):
            target = unit(torch.relu(q.bn(q.stem(x))))
    rep = reconstruct_unit(unit, (inp,), target, ReconOptions(iters=150, progress=False,
                                                              bn_weight=0.0), pot=True)
    assert rep.error_after < rep.error_before and not rep.reverted
    assert all(m.exponent.dtype == torch.int32 for m in unit.modules()
               if isinstance(m, PoTQuantizer))


def test_full_modes_never_worse_than_their_start(setup):
    model, x = setup
    cfg = QuantConfig.uniform(2, 4)
    quick = lowbit.ptq(model, "rapq-quick", batches(x), cfg, x[:2], quick_iters=40,
                       progress=False)
    full = lowbit.ptq(model, "rapq", batches(x), cfg, x[:2], quick_iters=40, iters=100,
                      progress=False)
    rec = full.lowbit_rapq["reconstruction"]
    assert rec["kept"] == (rec["error_after"] <= rec["error_before"])
    assert out_error(full, model, x) <= out_error(quick, model, x) + 1e-6
    mse = lowbit.ptq(model, "mse", batches(x), cfg, x[:2], progress=False)
    brecq = lowbit.ptq(model, "brecq", batches(x), cfg, x[:2], iters=300, block_types=(Block,),
                       progress=False)
    assert [u["name"] for u in brecq.lowbit_rapq["units"]] == ["stem", "block", "fc"]
    assert brecq.lowbit_rapq["reconstruction"]["kept"]
    assert out_error(brecq, model, x) < 0.5 * out_error(mse, model, x)
    assert all(isinstance(m, UniformQuantizer) for m in quantizers(brecq))


def test_deterministic_under_fixed_seed(setup):
    model, x = setup
    a = rapq(model, batches(x), 4, 4, example_inputs=x[:2], seed=3, **FAST)
    b = rapq(model, batches(x), 4, 4, example_inputs=x[:2], seed=3, **FAST)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bn_statistics_used_or_fallback_announced(setup, caplog):
    model, x = setup
    q = rapq(model, batches(x), 4, 4, example_inputs=x[:2], **FAST)
    assert q.lowbit_rapq["bn_guided"].startswith("on: 3 BatchNorm targets")
    assert sum(u["bn_layers"] for u in q.lowbit_rapq["units"]) == 3
    flat = Net().eval()  # fresh BNs: mean 0, var 1, as in TFLite-derived models
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        q = rapq(flat, batches(x), 4, 4, example_inputs=x[:2], **FAST)
    assert "no BatchNorm statistics" in q.lowbit_rapq["bn_guided"]
    assert "data term alone" in caplog.text
    with pytest.raises(ConfigError, match="BN-guided reconstruction was forced"):
        rapq(flat, batches(x), 4, 4, example_inputs=x[:2], bn_guided=True, **FAST)
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(ConfigError, match="no BatchNorm"):
        rapq(no_bn, batches(x), 4, 4, example_inputs=x[:2], bn_guided=True, **FAST)


def test_bad_inputs_give_clear_errors(setup):
    model, x = setup
    with pytest.raises(ConfigError, match="bits"):
        rapq(model, batches(x), 9, 4, **FAST)
    with pytest.raises(ConfigError, match="at least 2 bits"):
        lowbit.ptq(model, "rapq", batches(x),
                   QuantConfig(weight=dict(bits=1, signed=False)), x[:2], **FAST)
    with pytest.raises(ConfigError, match="calibration images"):
        rapq(model, batches(x[:4]), 4, 4, **FAST)
    bad = x.clone()
    bad[20, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="batch 1 contains NaN"):
        rapq(model, batches(bad), 4, 4, **FAST)
    with pytest.raises(ConfigError, match="'rapq-quick' takes no option iters; brecq, rapq take"):
        lowbit.ptq(model, "rapq-quick", batches(x), QuantConfig.uniform(4, 4), iters=5)
    with pytest.raises(ConfigError, match="takes no option itres"):
        lowbit.ptq(model, "rapq", batches(x), QuantConfig.uniform(4, 4), itres=5)


def test_cli_ptq_rapq(capsys, tmp_path):
    out = tmp_path / "r.json"
    rc = main(["ptq", "-m", "digits_cnn", "--method", "rapq", "--w-bits", "4", "--a-bits", "4",
               "--calib-size", "64", "--iters", "20", "--quick-iters", "10", "--round-weight",
               "0.5", "--lr-round", "0.05", "--no-progress", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["method"] == "rapq"
    assert res["options"] == {"iters": 20, "round_weight": 0.5, "lr_round": 0.05,
                              "quick_iters": 10}
    rc = main(["ptq", "-m", "digits_cnn", "--method", "mse", "--iters", "5", "--no-progress"])
    assert rc == 2 and "--iters does not apply" in capsys.readouterr().err


def test_saved_rapq_model_reloads_exactly(setup, tmp_path):
    from lowbit.pipeline import load_quantized, save_quantized

    model, x = setup
    q = rapq(model, batches(x), 4, 4, example_inputs=x[:2], **FAST)
    save_quantized(q, tmp_path / "q")
    again = load_quantized(model, tmp_path / "q", x[:2])
    assert all(m.exponent.dtype == torch.int32 for m in again.modules()
               if isinstance(m, PoTQuantizer))
    with torch.no_grad():
        assert torch.equal(again(x), q(x))


def test_quick_batch_default_and_override_are_recorded(setup):
    model, x = setup
    q = lowbit.ptq(model, "rapq-quick", batches(x), QuantConfig.uniform(4, 4), x[:2],
                   quick_iters=2, progress=False)
    assert q.lowbit_rapq["quick_batch_size"] == 32
    q = lowbit.ptq(model, "rapq-quick", batches(x), QuantConfig.uniform(4, 4), x[:2],
                   quick_iters=2, quick_batch_size=5, progress=False)
    assert q.lowbit_rapq["quick_batch_size"] == 5


def test_rapq_starts_from_least_error_exponents_naive_pot_from_nearest(setup):
    model, x = setup
    naive, quick = naive_and_quick(model, x, quick_iters=0)
    assert {m.rounding for m in naive.modules() if isinstance(m, PoTQuantizer)} == {"nearest"}
    assert {m.rounding for m in quick.modules() if isinstance(m, PoTQuantizer)} == {"mse"}
    for (name, a), (_, b) in zip(quant_layers(naive), quant_layers(quick), strict=True):
        w = a.weight
        err_naive = (a.weight_quant(w) - w).pow(2).flatten(1).mean(1)
        err_quick = (b.weight_quant(w) - w).pow(2).flatten(1).mean(1)
        assert (err_quick <= err_naive * (1 + 1e-6) + 1e-12).all(), name


def test_rapq_depthwise_inputs_per_channel_stay_integer_pow2(tmp_path):
    """Per-channel activation exponents at a depthwise input survive quick mode, block
    reconstruction and a save/load round trip as one integer exponent and zero-point per
    channel."""
    from lowbit.pipeline import load_quantized, save_quantized
    from tests.helpers import tiny

    torch.manual_seed(0)
    model = tiny()
    x = torch.rand(32, 3, 8, 8)
    cfg = QuantConfig.uniform(4, 4, dw_act_per_channel=True)
    q = lowbit.ptq(model, "rapq", batches(x), cfg, x[:2], **FAST)
    aq = q.dw.input_quant
    assert isinstance(aq, PoTQuantizer) and aq.per_channel and aq.ch_axis == 1
    scale, zp = aq.scale_zero_point()
    assert aq.exponent.dtype == torch.int32 and aq.exponent.shape == (8,)
    assert torch.equal(scale, torch.exp2(aq.exponent.float()))
    assert torch.equal(zp, torch.round(zp))
    assert not q.stem.input_quant.per_channel
    save_quantized(q, tmp_path / "q")
    again = load_quantized(model, tmp_path / "q", x[:2])
    assert torch.equal(again.dw.input_quant.exponent, aq.exponent)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
        assert torch.equal(again(x), q(x))


def test_full_mode_skips_the_network_adjustment_unless_asked(setup):
    """rapq-quick adjusts for QUICK_ITERS steps by default; full rapq (whose reconstruction
    searches the exponents) for none unless quick_iters is given."""
    from lowbit.ptq import RapqConfig, RapqQuickConfig
    from lowbit.ptq.configs import QUICK_ITERS

    assert RapqQuickConfig().quick_iters == QUICK_ITERS and RapqConfig().quick_iters == 0
    model, x = setup
    cfg = QuantConfig.uniform(4, 4)
    quick = lowbit.ptq(model, "rapq-quick", batches(x), cfg, x[:2], quick_iters=3, progress=False)
    assert quick.lowbit_rapq["quick"]["iters"] == 3
    full = lowbit.ptq(model, "rapq", batches(x), cfg, x[:2], iters=5, progress=False)
    assert full.lowbit_rapq["quick"]["iters"] == 0
    assert full.lowbit_rapq["quick"]["adjusted_error"] == full.lowbit_rapq["quick"]["naive_error"]
    asked = lowbit.ptq(model, "rapq", batches(x), cfg, x[:2], iters=5, quick_iters=2,
                       progress=False)
    assert asked.lowbit_rapq["quick"]["iters"] == 2


def test_zero_steps_runs_the_exponent_search_alone(setup):
    """iters=0: each unit ends in its start or its searched exponents, weights not rounded by
    AdaRound (still the float ones); float scales have nothing to search and are refused."""
    model, x = setup
    cfg = QuantConfig.uniform(2, 4)
    q = lowbit.ptq(model, "rapq", batches(x), cfg, x[:2], iters=0, progress=False)
    units = q.lowbit_rapq["units"]
    assert units and {u["kept"] for u in units} <= {"start", "search"}
    assert all(u["error_after"] <= u["error_before"] + 1e-9 for u in units)
    assert set(units[0]["candidates"]) <= {"start", "search"}
    naive = lowbit.ptq(model, "pot", batches(x), cfg, x[:2], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(
        (m.weight for _, m in quant_layers(q)), (m.weight for _, m in quant_layers(naive)),
        strict=True))
    with pytest.raises(ConfigError, match="exponent search alone"):
        lowbit.ptq(model, "brecq", batches(x), cfg, x[:2], iters=0, progress=False)
