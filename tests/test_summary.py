"""benchmarks/summary.py: the BENCHMARKS.md summary is read from the result files, cell by cell,
and ImageNet models are reported only on the 1000-class protocol rows."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import summary  # noqa: E402

MNV2, EFF = "mobilenet_v2_tflite", "efficientnet_lite0"


def row(model, method, w, a, top1, **kw):
    return {"model": model, "method": method, "w_bits": w, "a_bits": a, "top1": top1, **kw}


@pytest.fixture
def results(tmp_path):
    files = {
        "ptq_baseline": [row("resnet20", "float", 32, 32, 90.0),
                         row("resnet20", "mse", 8, 8, 89.5)],
        "rapq": [row("resnet20", "rapq", 4, 4, 88.0), row("resnet20", "rapq+fr", 4, 4, 88.9),
                 row(MNV2, "rapq", 4, 8, 74.39), row(EFF, "rapq", 4, 4, 73.97)],
        "brevitas_pot": [row("resnet20", "", 4, 4, 60.0), row("resnet20", "", 2, 4, 20.0),
                         row(MNV2, "", 4, 8, 32.89)],
        "ptq_protocol": [row(MNV2, "float", 32, 32, 75.0, protocol_name="diverse"),
                         row(EFF, "float", 32, 32, 80.0, protocol_name="diverse")],
        "rapq_protocol": [
            row(MNV2, "rapq", 4, 8, 70.0, float_top1=75.0, drop=5.0, drop_se=1.2,
                protocol_name="diverse"),
            row(MNV2, "rapq", 4, 8, 71.0, float_top1=78.0, drop=7.0, drop_se=0.9,
                protocol_name="narrow")],
        "qat_runs_long": [{"run": "qil_w4a4_kd", "top1": 89.0, "float_top1": 90.0, "drop": 1.0}],
        "sdq_a4_w3": [{"arm": "lsq", "top1": 80.0}, {"arm": "sdq", "top1": 85.0}],
    }
    folder = tmp_path / "results"
    folder.mkdir()
    for stem, rows in files.items():
        payload = {"rows": rows}
        if stem == "sdq_a4_w3":
            payload["float_top1"] = 90.0  # SDQ files record the float top-1 once, at the top
        (folder / f"{stem}.json").write_text(json.dumps(payload))
    return folder


def cells(folder):
    """The generated table as {(model, setting): {column: cell}}."""
    lines = [s for s in summary.block(folder).splitlines() if s.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for s in lines[1:]:
        vals = dict(zip(head, (c.strip() for c in s.strip("|").split("|")), strict=True))
        out[(vals["model"], vals["setting"])] = vals
    return out


def test_cifar_cells_come_from_their_rows(results):
    t = cells(results)
    r = t[("resnet20", "W4A4 power-of-two")]
    # the plain recipe's row, not the better-scoring flagged variant
    assert (r["float"], r["top-1"], r["drop"]) == ("90.00", "88.00", "2.00")
    assert (r["best peer"], r["peer top-1"]) == ("Brevitas PoT", "60.00")
    assert r["source"] == "rapq.json; ptq_baseline.json (float); brevitas_pot.json"
    assert t[("resnet20", "W8A8 uniform")]["top-1"] == "89.50"
    assert t[("resnet20", "W2A4 power-of-two")]["top-1"] == "not run"
    assert t[("resnet20", "W2A4 power-of-two")]["peer top-1"] == "20.00"
    assert t[("resnet20", "W4A4 QAT")]["drop"] == "1.00"
    sdq = t[("resnet20", "mixed, BitOPs of W3A4")]
    assert (sdq["float"], sdq["top-1"], sdq["drop"]) == ("90.00", "85.00", "5.00")


def test_imagenet_models_only_on_the_1000_class_protocol(results):
    t = cells(results)
    m = t[(MNV2, "W4A8 power-of-two")]
    assert (m["float"], m["top-1"], m["drop"]) == ("75.00", "70.00", "5.00 ± 1.20")
    assert m["drop, narrow calib."] == "7.00 ± 0.90"
    # the Imagenette-only Brevitas row and the Imagenette rapq rows are never used
    assert m["peer top-1"] == summary.MISSING_1000
    e = t[(EFF, "W4A4 power-of-two")]
    assert e["top-1"] == summary.MISSING_1000 and e["float"] == "80.00"
    assert "74.39" not in summary.block(results) and "73.97" not in summary.block(results)


def test_a_named_config_row_fills_its_recipe_cell(results):
    path = results / "rapq_protocol.json"
    data = json.loads(path.read_text())
    data["rows"] += [row(MNV2, "rapq", 4, 4, 60.0, config="rapq-dw-rs", float_top1=75.0,
                         drop=15.0, drop_se=1.6, protocol_name="diverse"),
                     row(MNV2, "rapq", 4, 4, 20.0, config="rapq", protocol_name="diverse")]
    path.write_text(json.dumps(data))
    m = cells(results)[(MNV2, "W4A4 power-of-two")]
    assert (m["lowbit recipe"], m["top-1"], m["drop"]) == ("`rapq+dw+rs`", "60.00", "15.00 ± 1.60")


def test_two_rows_for_one_cell_is_an_error(results):
    path = results / "rapq.json"
    data = json.loads(path.read_text())
    data["rows"].append(row("resnet20", "rapq", 4, 4, 87.0))
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="2 rows match"):
        summary.block(results)


def test_check_and_rewrite_keep_the_rest_of_the_document(results, tmp_path, capsys):
    doc = tmp_path / "B.md"
    doc.write_text(f"# B\n\n{summary.START}\nstale\n{summary.END}\n\n## Method\ntext\n")
    args = ["--results", str(results), "--doc", str(doc)]
    assert summary.main([*args, "--check"]) == 1
    assert "stale" in doc.read_text()  # --check writes nothing
    assert summary.main(args) == 0
    text = doc.read_text()
    assert text.startswith("# B\n\n" + summary.START) and text.endswith("## Method\ntext\n")
    assert "stale" not in text and "| resnet20" in text
    assert summary.main([*args, "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_committed_summary_is_current():
    """BENCHMARKS.md's block is what the committed result files give (else: run the script)."""
    doc = summary.DOC.read_text()
    assert summary.START in doc and doc.index(summary.START) < doc.index("\n## ")
    assert summary.rewrite(doc, summary.block()) == doc, "run python benchmarks/summary.py"
