"""DQSS: strategy search in PTQ and QAT mode, its config, determinism and errors."""

import json

import pytest
import torch
from torch import nn

from lowbit import ConfigError, QuantConfig, prepare
from lowbit.cli import main
from lowbit.data import load_dataset, make_loader, subset
from lowbit.models import get_model, get_spec
from lowbit.prepare import quant_layers
from lowbit.ptq import ptq
from lowbit.qat import TrainHook
from lowbit.quant import MixtureQuantizer
from lowbit.search import DQSSResult, DQSSSettings, dqss_search, run_search, search_names
from lowbit.train import train_epochs

W = ["minmax", "lsq", "qil"]
A = ["mse", "lsq", "pact"]
PTQ = dict(mode="ptq", w_bits=3, a_bits=3, w_candidates=W, a_candidates=A, iters=30,
           finetune_iters=10, batch_size=32, progress=False)
QAT = dict(mode="qat", w_bits=3, a_bits=3, w_candidates=W, a_candidates=A, steps=20,
           check_every=5, calib_batches=2, warmup=0.25, progress=False)


@pytest.fixture(scope="module")
def digits():
    """A digits CNN trained briefly on 256 images, its loader and an example batch."""
    torch.manual_seed(0)
    spec = get_spec("digits_cnn")
    train = subset(load_dataset("digits", split="train", mean=spec.mean, std=spec.std), 256, 0)
    loader = make_loader(train, 64, shuffle=True, seed=0)
    model = get_model("digits_cnn")
    train_epochs(model, loader, 2, lr=1e-2)
    return model.eval(), loader, next(iter(loader))[0][:2]


def kinds(model):
    return {n: ((m.weight_quant.kind, m.weight_quant.observer.method),
                (m.input_quant.kind, m.input_quant.observer.method))
            for n, m in quant_layers(model)}


def test_ptq_search_chooses_per_layer_and_the_config_reproduces_it(digits):
    model, loader, ex = digits
    r = dqss_search(model, loader, None, ex, **PTQ)
    assert isinstance(r, DQSSResult) and "dqss" in search_names()
    # first and last layers stay at 8 bits, unsearched; the two middle convs are searched
    assert list(r.choices) == ["features.3", "features.6"]
    for sides in r.choices.values():
        assert sides["weight"] in W and sides["act"] in A
    for probs in r.probabilities.values():
        assert len(probs["weight"]) == 3 and abs(sum(probs["act"]) - 1) < 1e-5
    assert not any(isinstance(m, MixtureQuantizer) for m in r.model.modules())
    again = prepare(model, r.config, ex)
    assert kinds(again) == kinds(r.model)
    assert {n: m.w_bits for n, m in quant_layers(again)} == {
        "features.0": 8, "features.3": 3, "features.6": 3, "fc": 8}
    # re-applied by a calibration PTQ method: the rules' kinds and observers survive
    assert kinds(ptq(model, "mse", loader, r.config, ex, progress=False)) == kinds(r.model)
    for h in r.history:
        assert h["error_final"] <= max(h["error_discrete"], h["error_calibrated"]) + 1e-9


def test_search_is_deterministic_for_a_seed(digits):
    model, loader, ex = digits
    fresh = lambda: make_loader(loader.dataset, 64, shuffle=True, seed=1)  # noqa: E731
    a = dqss_search(model, fresh(), None, ex, **PTQ)
    b = dqss_search(model, fresh(), None, ex, **PTQ)
    assert a.choices == b.choices and a.probabilities == b.probabilities
    c = run_search("dqss", model, fresh(), None, ex, **QAT)
    d = run_search("dqss", model, fresh(), None, ex, **QAT)
    assert c.choices == d.choices and c.probabilities == d.probabilities


def test_finetuned_choice_is_never_worse_than_the_argmax_and_is_recorded(digits):
    model, loader, ex = digits
    # a data order whose 2-bit search has units where the argmax is not the best option
    fresh = lambda: make_loader(loader.dataset, 64, shuffle=True, seed=3)  # noqa: E731
    two_bits = {**PTQ, "w_bits": 2, "a_bits": 2}
    argmax = dqss_search(model, fresh(), None, ex, **two_bits, choose_by="argmax")
    aware = dqss_search(model, fresh(), None, ex, **two_bits)
    assert aware.settings.choose_by == "finetuned"
    # the first searched unit sees the same inputs in both runs: the same argmax unit
    first = lambda r: next(h for h in r.history if h["unit"] == "features.3")  # noqa: E731
    assert first(aware)["error_argmax"] == first(argmax)["error_final"]
    assert first(aware)["error_final"] <= first(argmax)["error_final"]
    for h in argmax.history:
        assert h["changed"] == [] and h["choice"] == "argmax" and list(h["options"]) == ["argmax"]
    searched = [h for h in aware.history if h["unit"] in ("features.3", "features.6")]
    for h in searched:
        assert h["error_final"] <= h["error_argmax"] == h["options"]["argmax"]
        assert h["error_final"] == min(h["options"].values())
        assert set(h["options"]) <= {"argmax", *W, *A}
    changed = [c for h in aware.history for c in h["changed"]]
    assert changed, "the tiny model at 2 bits should have a unit whose argmax is not the best"
    names = {"weight": W, "act": A}
    for layer, sides in aware.choices.items():
        for side, chosen in sides.items():
            probs = aware.probabilities[layer][side]
            top = names[side][max(range(len(probs)), key=probs.__getitem__)]
            moved = [c for c in changed if (c["layer"], c["side"]) == (layer, side)]
            assert (chosen, top) == ((moved[0]["chosen"], moved[0]["argmax"]) if moved
                                     else (chosen, chosen))
    assert kinds(prepare(model, aware.config, ex)) == kinds(aware.model)
    again = dqss_search(model, fresh(), None, ex, **two_bits)
    untimed = lambda r: [{**h, "seconds": 0} for h in r.history]  # noqa: E731
    assert again.choices == aware.choices and untimed(again) == untimed(aware)


def test_options_are_compared_early_and_only_the_winner_finishes(digits):
    """``compare_iters`` below ``finetune_iters``: the unit keeps the option with the lowest
    error at the comparison; one option alone runs exactly as an uninterrupted fine-tune."""
    model, loader, ex = digits
    fresh = lambda: make_loader(loader.dataset, 64, shuffle=True, seed=3)  # noqa: E731
    two_bits = {**PTQ, "w_bits": 2, "a_bits": 2, "finetune_iters": 12}
    r = dqss_search(model, fresh(), None, ex, **two_bits, compare_iters=4)
    searched = [h for h in r.history if h["unit"] in ("features.3", "features.6")]
    assert any(len(h["options"]) > 1 for h in searched)
    for h in searched:
        assert h["options"][h["choice"]] == min(h["options"].values())
        assert h["error_argmax"] == h["options"]["argmax"]
    single = {**two_bits, "w_candidates": ["lsq"], "a_candidates": ["pact"]}
    early = dqss_search(model, fresh(), None, ex, **single, compare_iters=4)
    late = dqss_search(model, fresh(), None, ex, **single, compare_iters=0)
    for a, b in zip(early.history, late.history, strict=True):  # the same run, seen earlier too
        assert a["error_final"] == min(b["error_final"], a["options"]["argmax"])
    assert any(a["error_final"] == b["error_final"]
               for a, b in zip(early.history, late.history, strict=True))


def test_qat_warms_up_then_moves_and_anneals(digits):
    model, loader, ex = digits
    r = dqss_search(model, loader, None, ex, **QAT, finetune_steps=4)
    first, last = r.history[0], r.history[-1]
    assert first["step"] == 5 and last["step"] == 20
    assert all(abs(p - 1 / 3) < 1e-6 for ps in first["probabilities"] for p in ps)  # warm-up
    assert any(abs(p - 1 / 3) > 1e-4 for ps in last["probabilities"] for p in ps)
    assert last["temperature"] == pytest.approx(0.1)
    assert set(r.choices) == {"features.3", "features.6"}
    assert r.config.weight.kind == "lsq"  # QAT: fixed layers are LSQ


def test_search_on_a_mixed_precision_config_keeps_its_bits(digits, tmp_path):
    model, loader, ex = digits
    base = QuantConfig.uniform(4, 4, kind="lsq", observer="mse", layers=[
        {"match": "features.3", "w_bits": 2}, {"match": "features.6", "w_bits": 5}])
    path = base.save(tmp_path / "sdq.yaml")
    r = dqss_search(model, loader, None, ex, **{**PTQ, "base_config": str(path)})
    bits = {n: m.w_bits for n, m in quant_layers(prepare(model, r.config, ex))}
    assert bits["features.3"] == 2 and bits["features.6"] == 5
    assert {n: m.w_bits for n, m in quant_layers(r.model)} == bits


def test_qat_default_weight_candidates_leave_out_qil():
    assert "qil" in DQSSSettings().w_candidates
    assert "qil" not in DQSSSettings(mode="qat").w_candidates


def test_bad_input_is_a_clear_error(digits):
    model, loader, ex = digits
    with pytest.raises(ConfigError, match="takes no budget"):
        dqss_search(model, loader, 3.0, ex, **PTQ)
    with pytest.raises(ConfigError, match="w_candidates is empty"):
        dqss_search(model, loader, None, ex, **{**PTQ, "w_candidates": []})
    with pytest.raises(ConfigError, match="unknown quantization strategy"):
        dqss_search(model, loader, None, ex, **{**PTQ, "a_candidates": ["mse", "what"]})
    with pytest.raises(ConfigError, match="'minmax' cannot represent 1 bits"):
        dqss_search(model, loader, None, ex, **{**PTQ, "w_bits": 1, "w_candidates": ["lsq",
                                                                                  "minmax"]})
    two = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    two(ex)
    with pytest.raises(ConfigError, match="no layer is left to search"):
        dqss_search(two.eval(), loader, None, ex, **PTQ)


def test_result_files(digits, tmp_path):
    pytest.importorskip("matplotlib")
    model, loader, ex = digits
    r = dqss_search(model, loader, None, ex, **PTQ)
    files = r.save(tmp_path)
    assert set(files) == {"config", "json", "table", "plot"} and files["plot"].stat().st_size
    data = json.loads(files["json"].read_text())
    assert data["choices"] == r.choices and data["candidates"]["act"] == A
    assert "features.3" in files["table"].read_text()
    assert QuantConfig.load(files["config"]) == r.config


def test_cli_search_dqss(digits, tmp_path, capsys):
    model, _, _ = digits
    weights = tmp_path / "digits.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "found"
    rc = main(["search", "--method", "dqss", "--mode", "ptq", "-m", "digits_cnn", "-w",
               str(weights), "--w-bits", "3", "--a-bits", "3", "--w-candidates", "minmax,lsq",
               "--a-candidates", "mse,pact", "--iters", "10", "--finetune-iters", "5",
               "--train-size", "128", "--batch-size", "64", "--no-plot", "--no-progress",
               "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "lowbit ptq" in captured.out and (out / "config.yaml").is_file()
    rc = main(["search", "--method", "dqss", "-m", "digits_cnn", "--budget", "3",
               "--train-size", "128", "--no-progress", "-o", str(tmp_path / "x")])
    assert rc == 2 and "takes no budget" in capsys.readouterr().err


def test_first_last_same_searches_the_edges_too(digits):
    model, loader, ex = digits
    r = dqss_search(model, loader, None, ex, **{**PTQ, "first_last": "same", "iters": 6,
                                                "finetune_iters": 2})
    assert list(r.choices) == ["features.0", "features.3", "features.6", "fc"]
    assert {n: m.w_bits for n, m in quant_layers(r.model)}["fc"] == 3


class Interrupt(TrainHook):
    """Simulates a kill after ``at`` search steps."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, ctx):
        if ctx.step + 1 == self.at:
            raise KeyboardInterrupt


def test_interrupted_qat_search_resumes_to_the_uninterrupted_result(digits, tmp_path):
    model, loader, ex = digits
    fresh = lambda: make_loader(loader.dataset, 64, shuffle=True, seed=3)  # noqa: E731
    opts = {**QAT, "steps": 10, "check_every": 2}
    full = dqss_search(model, fresh(), None, ex, output_dir=tmp_path / "a", **opts)
    with pytest.raises(KeyboardInterrupt):
        dqss_search(model, fresh(), None, ex, output_dir=tmp_path / "b",
                    hooks=[Interrupt(len(loader) + 2)], **opts)
    resumed = dqss_search(model, fresh(), None, ex, output_dir=tmp_path / "b", resume=True,
                          **opts)
    assert resumed.choices == full.choices and resumed.history == full.history
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
