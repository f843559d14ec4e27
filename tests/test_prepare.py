"""prepare: BN folding equivalence, swaps, float fallbacks, first/last policy, modes."""

import pytest
import torch
from torch import nn

from lowbit.config import LayerRule, QuantConfig
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn import QConv2d, QLinear
from lowbit.prepare import (
    calibrate,
    execution_order,
    float_mode,
    fold_batchnorm,
    prepare,
    quantizers,
    set_mode,
)
from tests.helpers import tiny

X = torch.randn(4, 3, 8, 8)


def test_folded_float_model_gives_same_outputs():
    model = tiny()
    ref = model(X)
    folded = prepare(model, QuantConfig(), X)
    set_mode(folded, "float")
    assert torch.allclose(folded(X), ref, atol=1e-5)
    assert folded.lowbit_report.folded == [("stem", "bn_stem"), ("dw", "bn_dw"), ("fc", "bn_fc")]
    assert isinstance(folded.bn_stem, nn.Identity)


def test_fold_without_example_uses_structure_and_matches():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                        nn.BatchNorm2d(2))
    from tests.helpers import randomize_bn

    randomize_bn(seq)
    ref = seq(X)
    pairs = fold_batchnorm(seq)
    assert pairs == [("0", "1"), ("3", "4")]
    assert torch.allclose(seq(X), ref, atol=1e-5)


def test_prepare_works_on_a_copy_and_reports_float_layers():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = prepare(model, QuantConfig(), X)
    assert isinstance(model.stem, nn.Conv2d) and not isinstance(model.stem, QConv2d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert isinstance(q.stem, QConv2d) and isinstance(q.fc, QLinear)
    assert q.lowbit_report.kept_float == {"odd": "unsupported layer type Conv1d"}


def test_unfolded_bn_is_listed_as_float():
    q = prepare(tiny(), QuantConfig(fold_bn=False), X)
    assert q.lowbit_report.kept_float["bn_stem"] == "BatchNorm not folded"


def test_execution_order_not_registration_order():
    model = tiny()
    order = execution_order(model, X)
    assert order.index("stem") < order.index("head")
    q = prepare(model, QuantConfig.uniform(4, 4), X)
    assert q.lowbit_report.first_layer == "stem"
    assert q.lowbit_report.last_layer == "head"


@pytest.mark.parametrize("policy", ["8bit", "float", "same"])
def test_first_last_policy_is_explicit_and_recorded(policy):
    q = prepare(tiny(), QuantConfig.uniform(3, 4, first_last=policy), X)
    rep = q.lowbit_report
    assert rep.policy == {"first": policy, "last": policy}
    if policy == "float":
        assert isinstance(q.stem, nn.Conv2d) and not isinstance(q.stem, QConv2d)
        assert "first layer kept in float" in rep.kept_float["stem"]
        assert "last layer kept in float" in rep.kept_float["head"]
    else:
        expected = 8 if policy == "8bit" else 3
        assert q.stem.w_bits == expected and q.head.w_bits == expected
    assert q.dw.w_bits == 3 and q.dw.a_bits == 4


def test_rules_by_exact_glob_and_type_with_precedence():
    cfg = QuantConfig.uniform(4, 4, first_last="same", layers=[
        LayerRule(match="type:Linear", w_bits=6),
        LayerRule(match="f*", w_bits=5),
        LayerRule(match="head", w_bits=2, a_bits=3),
        LayerRule(match="dw", keep_float=True),
    ])
    q = prepare(tiny(), cfg, X)
    assert (q.fc.w_bits, q.head.w_bits, q.head.a_bits, q.stem.w_bits) == (5, 2, 3, 4)
    assert not isinstance(q.dw, QConv2d)


def test_exact_rule_overrides_edge_policy_but_glob_does_not():
    cfg = QuantConfig.uniform(4, 4, layers=[LayerRule(match="*", w_bits=2),
                                            LayerRule(match="head", w_bits=5)])
    q = prepare(tiny(), cfg, X)
    assert q.stem.w_bits == 8 and q.head.w_bits == 5 and q.fc.w_bits == 2


def test_rule_naming_unknown_layer_is_an_error():
    cfg = QuantConfig(layers=[LayerRule(match="no_such_layer", w_bits=4)])
    with pytest.raises(ConfigError, match="no_such_layer"):
        prepare(tiny(), cfg, X)


def test_weight_only_quantization_leaves_inputs_float():
    q = prepare(tiny(), QuantConfig.uniform(4, None), X)
    assert q.fc.input_quant is None and q.fc.a_bits == 32


def test_calibrate_then_modes_switch_explicitly():
    model = tiny()
    ref = model(X)
    q = prepare(model, QuantConfig.uniform(8, 8), X)
    assert all(qz.mode.value == "float" for qz in quantizers(q))
    calibrate(q, [(X, None)], progress=False)
    assert all(qz.mode.value == "quantize" for qz in quantizers(q))
    out = q(X)
    assert not torch.equal(out, ref)
    assert torch.allclose(out, ref, atol=0.2 * ref.abs().max().item())
    with float_mode(q):
        assert torch.allclose(q(X), ref, atol=1e-5)
    assert all(qz.mode.value == "quantize" for qz in quantizers(q))
    with pytest.raises(ConfigError, match="unknown mode"):
        set_mode(q, "fast")


def test_empty_calibration_set_is_an_error():
    q = prepare(tiny(), QuantConfig(), X)
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(q, [], progress=False)
    assert all(qz.mode.value == "float" for qz in quantizers(q))


def test_nan_in_calibration_names_the_layer():
    q = prepare(tiny(), QuantConfig(), X)
    bad = X.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"stem\.input_quant"):
        calibrate(q, [bad], progress=False)


def test_calibrate_unprepared_model_is_an_error():
    with pytest.raises(ConfigError, match="prepare"):
        calibrate(tiny(), [X], progress=False)


def test_prepared_model_state_dict_reloads_into_fresh_prepare():
    model = tiny()
    cfg = QuantConfig.uniform(4, 4, layers=[LayerRule(match="fc", w_bits=3)])
    q = calibrate(prepare(model, cfg, X), [X], progress=False)
    fresh = prepare(model, cfg, X)
    fresh.load_state_dict(q.state_dict())
    set_mode(fresh, "quantize")
    assert torch.equal(fresh(X), q(X))


def test_weights_observed_once_activations_every_batch():
    q = prepare(tiny(), QuantConfig.uniform(4, 4), X)
    seen = {}
    for qz in quantizers(q):
        qz.observer.update = (lambda orig, n: lambda x: (seen.__setitem__(n, seen.get(n, 0) + 1),
                                                        orig(x))[1])(qz.observer.update, qz.name)
    calibrate(q, [X, X, X], progress=False)
    assert seen["stem.weight_quant"] == 1
    assert seen["stem.input_quant"] == 3
