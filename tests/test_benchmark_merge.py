"""benchmarks/merge_rows.py: a separate run's rows replace the committed ones and the old rows
are kept, so no measured row is lost when results are merged."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from merge_rows import merge  # noqa: E402


def row(method, top1, w=4):
    return {"model": "m", "method": method, "w_bits": w, "a_bits": 4, "top1": top1,
            "command": f"run {method} {top1}"}


def write(path, rows):
    path.write_text(json.dumps({"rows": rows}))


def read(path):
    return json.loads(path.read_text())["rows"]


def test_replaced_rows_move_to_the_archive(tmp_path):
    write(tmp_path / "res.json", [row("rapq", 1.0), row("pot", 2.0)])
    write(tmp_path / "new.json", [row("rapq", 3.0), row("rapq", 4.0, w=2)])
    replaced = merge(tmp_path / "new.json", tmp_path / "res", note="re-run")
    assert replaced == [("m", "rapq", 4, 4, None, None, None)]
    rows = {(r["method"], r["w_bits"]): r for r in read(tmp_path / "res.json")}
    assert {k: r["top1"] for k, r in rows.items()} == {("pot", 4): 2.0, ("rapq", 4): 3.0,
                                                        ("rapq", 2): 4.0}
    assert rows[("rapq", 4)]["note"] == "re-run"
    old = read(tmp_path / "archive" / "res_superseded.json")
    assert [r["top1"] for r in old] == [1.0] and old[0]["superseded_by"] == "run rapq 3.0"
    assert "note" in (tmp_path / "res.csv").read_text().splitlines()[0]


def test_two_rows_for_one_setting_are_refused(tmp_path):
    write(tmp_path / "res.json", [row("pot", 2.0)])
    write(tmp_path / "new.json", [row("rapq", 3.0), row("rapq", 4.0)])
    with pytest.raises(SystemExit, match="two rows for one setting"):
        merge(tmp_path / "new.json", tmp_path / "res", note=None)
    assert read(tmp_path / "res.json") == [row("pot", 2.0)]


def test_rows_of_two_protocols_are_kept_apart(tmp_path):
    diverse, narrow = ({**row("rapq", t), "protocol_name": p}
                       for t, p in ((1.0, "diverse"), (2.0, "narrow")))
    write(tmp_path / "res.json", [diverse, narrow])
    write(tmp_path / "new.json", [{**row("rapq", 3.0), "protocol_name": "diverse"}])
    assert merge(tmp_path / "new.json", tmp_path / "res", None) == [("m", "rapq", 4, 4, "diverse", None, None)]
    kept = {r["protocol_name"]: r["top1"] for r in read(tmp_path / "res.json")}
    assert kept == {"diverse": 3.0, "narrow": 2.0}


def test_variants_and_calibration_sets_are_kept_apart(tmp_path):
    """narrow_calib.py rows: one per variant and calibration set."""
    old = [{**row("rapq", 1.0), "variant": "default", "calib": c} for c in ("narrow", "diverse")]
    write(tmp_path / "res.json", old)
    write(tmp_path / "new.json", [{**row("rapq", 2.0), "variant": "other", "calib": "narrow"},
                                  {**row("rapq", 3.0), "variant": "default", "calib": "narrow"}])
    assert merge(tmp_path / "new.json", tmp_path / "res", None) == [
        ("m", "rapq", 4, 4, None, "default", "narrow")]
    kept = {(r["variant"], r["calib"]): r["top1"] for r in read(tmp_path / "res.json")}
    assert kept == {("default", "diverse"): 1.0, ("other", "narrow"): 2.0,
                    ("default", "narrow"): 3.0}
