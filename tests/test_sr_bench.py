"""benchmarks/sr.py: every run's label says the bits its command (or its config file) sets, the
range-calibration methods have the same runs, and ``--into`` merges rows into a results file,
the new row replacing the old one of the same dataset and label."""

import json
import re
import sys
from pathlib import Path

import pytest

from lowbit.config import QuantConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import sr as bench  # noqa: E402


def _bits(extra: list[str]) -> tuple[int, int] | None:
    if "--config" in extra:
        cfg = QuantConfig.load(ROOT / extra[extra.index("--config") + 1])
        return cfg.weight.bits, cfg.act.bits
    if "--w-bits" in extra:
        return int(extra[extra.index("--w-bits") + 1]), int(extra[extra.index("--a-bits") + 1])
    return None


@pytest.mark.parametrize("label", [k for k in bench.RUNS if re.search(r"W\d+A\d+", k)])
def test_label_bits_match_the_command_or_config(label):
    kind, extra = bench.RUNS[label]
    w, a = map(int, re.search(r"W(\d+)A(\d+)", label).groups())
    assert _bits(extra) == (w, a)
    assert ("PAMS policy" in label) == ("--config" in extra)
    if kind == "ptq":
        assert extra[extra.index("--method") + 1] == label.split()[0]


def test_minmax_and_mse_have_the_same_runs():
    labels = {m: {k.split(" ", 1)[1] for k in bench.RUNS if k.split()[0] == m}
              for m in ("minmax", "mse")}
    assert labels["minmax"] == labels["mse"]
    assert {"W8A8", "W4A4", "W2A4", "W4A4 PAMS policy (body only)",
            "W2A4 PAMS policy (body only)"} <= labels["minmax"]


@pytest.mark.parametrize("method", ["lsq", "qil"])
def test_w2a4_pams_qat_recipes_are_their_w4a4_twins_at_2_bit_weights(method):
    """Only the weight bits (and the grid, stated) differ from the W4A4 recipe; LSQ's 2-bit grid
    is the four levels of the PTQ W2A4 recipe, QIL's is ternary by construction."""
    label = f"{method} W2A4 PAMS policy (body only)"
    kind, extra = bench.RUNS[label]
    assert kind == "qat"
    cfg = QuantConfig.load(ROOT / extra[extra.index("--config") + 1]).model_dump()
    twin = QuantConfig.load(ROOT / f"recipes/pams_edsr_w4a4_{method}.yaml").model_dump()
    assert cfg["weight"]["bits"] == 2
    cfg["weight"].update(bits=4, narrow_range=False)
    assert cfg == twin
    weight = QuantConfig.load(ROOT / extra[extra.index("--config") + 1]).weight.build(signed=True)
    ptq = QuantConfig.load(ROOT / bench.PAMS2).weight.build(signed=True)
    assert weight.qrange == (ptq.qrange if method == "lsq" else (-1, 1))


def _ptq_result(psnr: float) -> dict:
    return {"float": {"psnr_y": 30.0, "ssim": 0.9, "bicubic_psnr_y": 29.0, "bicubic_ssim": 0.8},
            "quantized": {"psnr_y": psnr, "ssim": 0.85, "psnr_vs_reference": 40.0},
            "ptq_seconds": 1.0}


def test_into_merges_rows_replacing_the_same_label(tmp_path):
    """With --reuse the saved results file is read, no lowbit command runs."""
    into = tmp_path / "sr.json"
    old = [{"dataset": "sr-sklearn", "model": "bicubic", "psnr_y": 29.0, "ssim": 0.8,
            "drop": -1.0, "run": "r0"},
           {"dataset": "sr-sklearn", "model": "float", "psnr_y": 30.0, "ssim": 0.9,
            "drop": 0.0, "run": "r0"},
           {"dataset": "sr-sklearn", "model": "mse W4A4", "psnr_y": 29.5, "ssim": 0.85,
            "drop": -0.5, "run": "r0"},
           {"dataset": "sr-sklearn", "model": "minmax W4A4", "psnr_y": 1.0, "ssim": 0.1,
            "drop": -29.0, "run": "r0"}]
    into.write_text(json.dumps({"model": "edsr_small_x2", "rows": old, "command": "c"}))
    out = tmp_path / "rows.json"
    work = out.with_suffix("")
    work.mkdir()
    for name, psnr in (("minmax_W4A4", 29.25), ("minmax_W8A8", 29.9)):
        (work / f"sr-sklearn-{name}.json").write_text(json.dumps(_ptq_result(psnr)))
    bench.main(["--datasets", "sr-sklearn", "--reuse", "--runs", "minmax W4A4", "minmax W8A8",
                "--out", str(out), "--into", str(into)])
    rows = json.loads(into.read_text())["rows"]
    by_label = {r["model"]: r for r in rows}
    assert [r["model"] for r in rows][:2] == ["bicubic", "float"]
    assert len(rows) == 5  # bicubic, float, mse W4A4 kept, minmax W4A4 replaced, W8A8 added
    assert by_label["mse W4A4"]["psnr_y"] == 29.5
    assert by_label["minmax W4A4"]["psnr_y"] == 29.25
    assert by_label["minmax W4A4"]["drop"] == pytest.approx(-0.75)
    assert by_label["minmax W8A8"]["drop"] == pytest.approx(-0.1)
    assert "--method minmax --w-bits 8 --a-bits 8" in by_label["minmax W8A8"]["command"]
