"""Configs: typed validation, YAML/JSON round trips, re-applying a saved config."""

import pytest
import torch

from lowbit.config import EdgePolicy, LayerRule, QuantConfig, QuantizerSpec
from lowbit.errors import ConfigError
from lowbit.prepare import calibrate, prepare
from tests.helpers import tiny


def mixed() -> QuantConfig:
    return QuantConfig.uniform(4, 4, observer="mse", layers=[
        LayerRule(match="dw", w_bits=2),
        LayerRule(match="fc", weight={"per_channel": False}, a_bits=6),
        LayerRule(match="type:Conv1d", keep_float=True),
    ])


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    cfg = mixed()
    path = cfg.save(tmp_path / f"cfg{suffix}")
    again = QuantConfig.load(path)
    assert again == cfg
    assert again.first_layer is EdgePolicy.INT8


def test_saved_config_reapplied_gives_same_bits(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    a = prepare(tiny(), mixed(), x)
    b = prepare(tiny(), QuantConfig.load(mixed().save(tmp_path / "c.yaml")), x)
    bits = lambda m: {n: v for n, v in m.lowbit_report.quantized.items()}  # noqa: E731
    assert bits(a) == bits(b)
    assert bits(a)["dw"] == (2, 4) and bits(a)["fc"] == (4, 6)
    assert b.fc.weight_quant.per_channel is False


@pytest.mark.parametrize("bad,match", [
    ({"weight": {"bits": 9}}, "bits must be from 1 to 8"),
    ({"act": {"bits": 0}}, "bits must be from 1 to 8"),
    ({"weight": {"observer": "magic"}}, "unknown observer"),
    ({"first_layer": "16bit"}, "first_layer"),
    ({"colour": "blue"}, "colour"),
    ({"layers": [{"match": "x", "w_bits": 12}]}, "w_bits"),
])
def test_bad_values_are_config_errors(tmp_path, bad, match):
    import yaml

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=match):
        prepare(tiny(), QuantConfig.load(p), torch.randn(1, 3, 8, 8))


def test_rule_bits_validated_on_construction():
    with pytest.raises(ValueError, match="bits must be from 1 to 8, got 11"):
        LayerRule(match="fc", w_bits=11)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        QuantConfig.load(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        QuantConfig.load(p)
    p.write_text("weight: {bits: [\n")
    with pytest.raises(ConfigError, match="not valid"):
        QuantConfig.load(p)


def test_unknown_quantizer_kind_rejected_when_built():
    with pytest.raises(ConfigError, match="unknown quantizer kind"):
        QuantizerSpec(kind="nope").build()


def test_uniform_helper_sets_both_edges():
    cfg = QuantConfig.uniform(2, 4, first_last="float")
    assert cfg.weight.bits == 2 and cfg.act.bits == 4
    assert cfg.first_layer is EdgePolicy.FLOAT and cfg.last_layer is EdgePolicy.FLOAT


def test_depthwise_type_rule_selects_depthwise_convs_only():
    model = tiny()
    x = torch.randn(2, 3, 8, 8)
    q = prepare(model, QuantConfig.uniform(4, 4, dw_act_per_channel=True), x)
    assert q.dw.input_quant.per_channel and q.dw.input_quant.ch_axis == 1
    assert not q.stem.input_quant.per_channel and not q.fc.input_quant.per_channel
    # type:Conv2d still selects every Conv2d, the depthwise one included
    cfg = QuantConfig.uniform(4, 4, first_last="same").model_copy(
        update={"layers": [LayerRule(match="type:Conv2d", a_bits=6)]})
    q = prepare(model, cfg, x)
    assert q.dw.input_quant.bits == 6 and q.stem.input_quant.bits == 6
    assert q.fc.input_quant.bits == 4


def test_dw_weight_bits_set_depthwise_weights_only_and_combine_with_dw_act(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    cfg = QuantConfig.uniform(4, 8, dw_weight_bits=8, dw_act_per_channel=True)
    q = prepare(tiny(), cfg, x)
    assert q.dw.weight_quant.bits == 8 and q.dw.input_quant.per_channel
    assert q.dw.input_quant.bits == 8
    assert q.fc.weight_quant.bits == 4 and q.stem.weight_quant.bits == 8  # first: policy
    assert QuantConfig.load(cfg.save(tmp_path / "c.yaml")) == cfg
    with pytest.raises(ConfigError):
        QuantConfig.uniform(4, 8, dw_weight_bits=9)


def test_dw_act_per_channel_round_trips_and_is_off_without_activations(tmp_path):
    cfg = QuantConfig.uniform(4, 4, dw_act_per_channel=True)
    assert QuantConfig.load(cfg.save(tmp_path / "c.yaml")) == cfg
    assert QuantConfig.uniform(4, None, dw_act_per_channel=True).layers == []


@pytest.mark.parametrize("kind", ["uniform", "pot"])
def test_full_range_weights_give_four_levels_at_two_bits(kind):
    model = tiny()
    x = torch.randn(4, 3, 8, 8)
    # the least-error (mse) scale clips, which reaches the extra negative code; a min-max
    # scale, amax / qmax, never does
    cfg = dict(kind=kind, observer="mse", first_last="same")
    narrow = prepare(model, QuantConfig.uniform(2, 4, **cfg), x)
    full = prepare(model, QuantConfig.uniform(2, 4, narrow_weights=False, **cfg), x)
    assert narrow.dw.weight_quant.qrange == (-1, 1)
    assert full.dw.weight_quant.qrange == (-2, 1)
    for q in (narrow, full):
        calibrate(q, [x], progress=False)
    codes_full = full.stem.weight_quant.integer_form(full.stem.weight).codes.unique()
    codes_narrow = narrow.stem.weight_quant.integer_form(narrow.stem.weight).codes.unique()
    assert set(codes_narrow.tolist()) <= {-1, 0, 1}
    assert set(codes_full.tolist()) == {-2, -1, 0, 1}
