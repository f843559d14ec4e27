"""Typed PTQ method configs: validation, YAML/JSON round trips, one registered handler per
method, and reruns from the method_config a results JSON holds."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.ptq import (
    PTQ_METHODS,
    BrecqConfig,
    MethodConfig,
    PotConfig,
    RapqConfig,
    RapqQuickConfig,
    load_method_config,
    method_config,
    register_ptq,
)
from lowbit.ptq.registry import ptq
from tests.test_rapq import Net, batches, trained_like_bn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# options that keep every handler to a fraction of a second on the tiny net
FAST = {"rapq-quick": {"quick_iters": 3}, "rapq": {"iters": 4}, "brecq": {"iters": 4}}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    return trained_like_bn(Net(), x), x


@pytest.mark.parametrize("cls, bad, message", [
    (RapqConfig, {"iters": -1}, "iters: Input should be greater than or equal to 0"),
    (RapqConfig, {"batch_size": 0}, "batch_size"),
    (RapqConfig, {"lr_round": 0.0}, "lr_round"),
    (RapqConfig, {"lr_round": float("inf")}, "lr_round: Input should be a finite number"),
    (RapqConfig, {"iters": 0, "exponent_search": False}, "needs power-of-two scales"),
    (RapqConfig, {"observer": "median"}, "unknown observer 'median'"),
    (RapqConfig, {"pot_rescale": "everything"}, "pot_rescale must be"),
    (RapqConfig, {"pot_rescale": "depthwise+streams"}, "linear streams was removed"),
    (RapqConfig, {"itres": 5}, "itres: Extra inputs are not permitted"),
    (RapqQuickConfig, {"quick_iters": -2}, "quick_iters"),
    (RapqQuickConfig, {"quick_batch_size": 0}, "quick_batch_size"),
    (BrecqConfig, {"iters": 0}, "give iters >= 1"),
    (BrecqConfig, {"warmup": 1.5}, "warmup"),
    (PotConfig, {"num_batches": 0}, "num_batches"),
])
def test_bad_values_are_refused_naming_the_field(cls, bad, message):
    with pytest.raises(ConfigError, match="invalid " + cls.__name__) as e:
        cls(**bad)
    assert message in str(e.value)


def test_options_of_another_method_name_the_methods_that_take_them():
    with pytest.raises(ConfigError, match="'pot' takes no option iters; brecq, rapq take it"):
        method_config("pot", iters=3)
    with pytest.raises(ConfigError, match="unknown PTQ method 'rapq2'"):
        method_config("rapq2")
    with pytest.raises(ConfigError, match="takes no option block_types|not to 'mse'"):
        ptq(nn.Linear(2, 2), "mse", [], block_types=(nn.Linear,))


def test_every_method_has_a_config_and_defaults_are_written_out():
    assert set(PTQ_METHODS) == {"minmax", "percentile", "mse", "pot", "rapq-quick", "rapq",
                                "brecq"}
    for name, m in PTQ_METHODS.items():
        c = m.config()
        assert c.method == name and issubclass(m.config, MethodConfig)
        assert set(c.to_dict()) == set(m.config.model_fields)
        undocumented = [k for k, f in m.config.model_fields.items()
                        if not f.description and k != "method"]  # method: the name itself
        assert undocumented == [], f"{name}: fields without a description {undocumented}"
    assert RapqQuickConfig().quick_iters == 300 and RapqConfig().quick_iters == 0
    assert RapqConfig(pot_rescale=True).pot_rescale == "depthwise"
    assert RapqConfig(pot_rescale=False).pot_rescale is None


recon_values = st.fixed_dictionaries({
    "iters": st.integers(1, 5000), "batch_size": st.integers(1, 512),
    "lr_round": st.none() | st.floats(1e-6, 1.0), "round_weight": st.floats(0, 10),
    "warmup": st.floats(0, 1), "beta": st.tuples(st.floats(1, 40), st.floats(0.5, 4)),
    "bn_weight": st.floats(0, 2), "bn_guided": st.none() | st.booleans(),
    "learn_a_scale": st.none() | st.booleans(), "exponent_search": st.booleans(),
    "seed": st.integers(0, 2**31 - 1), "quick_iters": st.integers(0, 400),
    "pot_rescale": st.sampled_from([None, "depthwise"]),
    "bias_correction": st.booleans(), "num_batches": st.none() | st.integers(1, 64),
})


@settings(max_examples=40, deadline=None)
@given(values=recon_values, suffix=st.sampled_from([".yaml", ".json"]))
def test_yaml_and_json_round_trip_to_an_equal_config(tmp_path_factory, values, suffix):
    cfg = RapqConfig(**values)
    path = cfg.save(tmp_path_factory.mktemp("cfg") / f"rapq{suffix}")
    again = load_method_config(path)
    assert type(again) is RapqConfig and again == cfg


@pytest.mark.parametrize("name", sorted(PTQ_METHODS))
def test_every_config_round_trips_through_yaml(tmp_path, name):
    cfg = method_config(name, bias_correction=True)
    assert load_method_config(cfg.save(tmp_path / "c.yaml")) == cfg


def test_a_file_under_method_config_and_bad_files(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(
        {"model": "x", "method_config": {"method": "brecq", "iters": 7}}))
    assert load_method_config(tmp_path / "run.json") == BrecqConfig(iters=7)
    (tmp_path / "bad.yaml").write_text("method: rapq\niters: many\n")
    with pytest.raises(ConfigError, match="bad.yaml.*iters"):
        load_method_config(tmp_path / "bad.yaml")
    (tmp_path / "none.yaml").write_text("iters: 3\n")
    with pytest.raises(ConfigError, match="'method' must name a PTQ method"):
        load_method_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_method_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", sorted(PTQ_METHODS))
def test_every_registered_handler_quantizes_a_tiny_model(setup, name):
    model, x = setup
    cfg = QuantConfig.uniform(4, 4)
    q = ptq(model, name, batches(x), cfg, x[:2], progress=False, **FAST.get(name, {}))
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert q.lowbit_config is not None and torch.isfinite(out).all()
    assert out.shape == ref.shape and not torch.equal(out, ref)
    if name in {"pot", "rapq-quick", "rapq", "brecq"}:
        assert q.lowbit_rapq["method"] == name


def test_a_config_object_runs_exactly_as_the_name_and_options(setup):
    model, x = setup
    cfg = QuantConfig.uniform(2, 4)
    by_name = ptq(model, "rapq", batches(x), cfg, x[:2], iters=6, seed=3, progress=False)
    by_cfg = lowbit.ptq(model, RapqConfig(iters=6, seed=3), batches(x), cfg, x[:2],
                        progress=False)
    merged = ptq(model, RapqConfig(iters=99), batches(x), cfg, x[:2], iters=6, seed=3,
                 progress=False)
    with torch.no_grad():
        assert torch.equal(by_name(x), by_cfg(x)) and torch.equal(by_name(x), merged(x))


def test_a_new_method_registers_with_its_config(setup):
    from typing import Literal

    from pydantic import Field

    class HalfConfig(MethodConfig):
        method: Literal["test-half"] = "test-half"
        factor: float = Field(0.5, gt=0, description="what the output is multiplied by")

    @register_ptq(HalfConfig)
    def half(model, config, calib_data, example_inputs, mc, *, progress=True):
        return nn.Sequential(model, _Scale(mc.factor))

    try:
        model, x = setup
        q = ptq(model, "test-half", [], factor=0.25)
        with torch.no_grad():
            assert torch.equal(q(x), model(x) * 0.25)
        with pytest.raises(ConfigError, match="already registered"):
            register_ptq(HalfConfig)(lambda *a, **k: None)
    finally:
        PTQ_METHODS.pop("test-half")


class _Scale(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x * self.f


CLI_BASE = ["ptq", "-m", "digits_cnn", "--w-bits", "2", "--a-bits", "4", "--calib-size", "64",
       "--eval-size", "64", "--no-progress"]


def test_the_results_json_reruns_to_the_identical_model(tmp_path, capsys):
    CLI = list(CLI_BASE)
    from safetensors.torch import save_file

    from lowbit.models import get_model

    torch.manual_seed(0)  # one float model for both runs (unnamed weights are random)
    save_file(get_model("digits_cnn").state_dict(), tmp_path / "w.safetensors")
    CLI += ["-w", str(tmp_path / "w.safetensors")]
    rc = main([*CLI, "--method", "rapq", "--iters", "5", "--round-weight", "0.1",
               "-o", str(tmp_path / "a.json"), "--save", str(tmp_path / "a")])
    assert rc == 0, capsys.readouterr().err
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["method_config"] == RapqConfig(iters=5, round_weight=0.1).to_dict()
    rc = main([*CLI, "--method-config", str(tmp_path / "a.json"),
               "-o", str(tmp_path / "b.json"), "--save", str(tmp_path / "b")])
    assert rc == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["method_config"] == first["method_config"]
    assert again["quantized"] == first["quantized"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_flags_override_the_file_and_mismatches_are_refused(tmp_path, capsys):
    CLI = CLI_BASE
    RapqQuickConfig(quick_iters=50).save(tmp_path / "q.yaml")
    rc = main([*CLI, "--method-config", str(tmp_path / "q.yaml"), "--quick-iters", "2",
               "-o", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["method"] == "rapq-quick" and res["method_config"]["quick_iters"] == 2
    rc = main([*CLI, "--method-config", str(tmp_path / "q.yaml"), "--method", "rapq"])
    assert rc == 2 and "disagrees with --method-config" in capsys.readouterr().err
    rc = main([*CLI, "--method-config", str(tmp_path / "q.yaml"), "--iters", "3"])
    assert rc == 2 and "--iters does not apply to --method rapq-quick" in capsys.readouterr().err


def test_every_benchmark_config_loads_into_a_typed_config():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_configs import config_names, load_recipe, row_config
    finally:
        sys.path.remove(str(BENCHMARKS))
    names = config_names()
    assert {"pot", "rapq", "brecq", "rapq-dw-rs", "rapq-dw-rs-fr"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert isinstance(r.method_config, MethodConfig) and name.startswith(r.method_config.method)
    r = load_recipe("rapq-dw-rs-fr")
    assert r.method_config == RapqConfig(pot_rescale="depthwise")
    assert r.quant == {"dw_act_per_channel": True, "narrow_weights": False}
    assert r.build(iters=300, quick_batch_size=None, exponent_search=None).iters == 300
    assert load_recipe("pot").build(iters=300) == PotConfig()  # options of other methods: skipped
    assert row_config({"method": "rapq+dw+rs"}) == "rapq-dw-rs"
    assert row_config({"method": "rapq", "config": "rapq-dw"}) == "rapq-dw"
    with pytest.raises(ConfigError, match=re.escape("no benchmark config 'rapq+dw'")):
        load_recipe("rapq+dw")


def test_every_committed_ptq_row_names_an_existing_config():
    """benchmarks/configs/README.md: each committed row's old '+' label is a config's name
    with '-' (the stream-rescaling row excepted: that method was removed)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_configs import config_names, row_config
    finally:
        sys.path.remove(str(BENCHMARKS))
    names, labels = set(config_names()), set()
    for path in (BENCHMARKS / "results").glob("rapq*.json"):
        labels |= {r["method"] for r in json.loads(path.read_text())["rows"]}
    assert {"rapq+dw+rs", "brecq+dw", "pot+bc"} <= labels
    missing = {m for m in labels if row_config({"method": m}) not in names}
    assert missing == {"rapq+dw+rs+st"}
