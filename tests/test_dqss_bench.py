"""benchmarks/dqss.py: saved per-image hits are found by model and setting, and a run with
another model, budget or --extra is refused rather than paired."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import dqss as bench  # noqa: E402

BUDGET = dict(model="resnet56", extra={"base_config": "c.yaml"}, w_bits=2, a_bits=4, iters=200)


def saved(tmp_path):
    row = dict(BUDGET, run="qil", top1=50.0)
    hits = torch.tensor([True, False, True])
    bench.save_hits(tmp_path, "W2A4", row, hits)
    return row, hits


def test_saved_hits_round_trip(tmp_path):
    row, hits = saved(tmp_path)
    assert (tmp_path / "resnet56" / "W2A4" / "qil.safetensors").is_file()
    got_row, got_hits = bench.load_hits(tmp_path, "W2A4", "qil", BUDGET)
    assert got_row == row
    assert torch.equal(got_hits, hits)


def test_other_model_is_not_found(tmp_path):
    saved(tmp_path)
    with pytest.raises(SystemExit, match="no saved run"):
        bench.load_hits(tmp_path, "W2A4", "qil", dict(BUDGET, model="resnet20"))


@pytest.mark.parametrize("change", [dict(extra={}), dict(iters=100)])
def test_other_settings_are_refused(tmp_path, change):
    saved(tmp_path)
    with pytest.raises(SystemExit, match="other settings"):
        bench.load_hits(tmp_path, "W2A4", "qil", dict(BUDGET, **change))


def test_paired_margin_and_error():
    a = torch.tensor([True, True, False, True])
    b = torch.tensor([True, False, False, False])
    margin, se = bench.paired(a, b)
    assert margin == pytest.approx(50.0)
    assert se == pytest.approx(100.0 * 0.57735026919 / 2)


def test_pairing_search_against_best_single_and_singles_against_search():
    hits = {"qil": torch.tensor([True, True, False, False]),
            "dqss": torch.tensor([True, True, True, False]),
            "mse": torch.tensor([True, False, False, False])}
    out = bench.pairing(hits)
    assert out["dqss"]["margin_against"] == "qil"
    assert out["dqss"]["margin"] == pytest.approx(25.0)
    assert set(out["dqss"]["margins"]) == {"qil", "mse"}
    assert out["dqss"]["margins"]["mse"][0] == pytest.approx(50.0)
    assert out["mse"]["margin_against"] == "dqss"
    assert out["mse"]["margin"] == pytest.approx(50.0)
    assert out["mse"]["margins"] is None


def test_pairing_without_a_search_or_a_single():
    alone = {"lsq": torch.tensor([True, False])}
    assert bench.pairing(alone)["lsq"]["margin"] is None
    search = {"dqss": torch.tensor([True, False])}
    assert bench.pairing(search)["dqss"]["margin_against"] is None
