"""Merge the rows of a separate benchmark run into a committed results file.

Long runs write to their own ``--out`` (two jobs at once never write one file); this moves
their rows in. A row replaces the row of the same model and setting (and method, where rows
have one); the replaced row is kept in ``archive/<into>_superseded.json`` (beside ``<into>``)
with what replaced it.

    python benchmarks/merge_rows.py /work/runs/mnv2_w4a8.json --into benchmarks/results/rapq \
        --note "default full rapq (no quick mode; exponent and zero-point search)"
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_configs import row_config  # noqa: E402
from common import load_rows, save_rows  # noqa: E402


def key(row: dict) -> tuple:
    """Rows of one model, method (its named config where it has one), setting and protocol
    replace each other; the 1000-class protocols (diverse, narrow) keep one row each, and so do
    the variants and calibration sets of narrow_calib.py. Rows without a method are told apart by their ``run`` and ``tag``
    (benchmarks/dqss.py)."""
    name = row_config(row) if row.get("config") else row.get("method", row.get("run"))
    if row.get("tag"):
        name = f"{name} [{row['tag']}]"
    return (row["model"], name, row["w_bits"], row["a_bits"], row.get("protocol_name"),
            row.get("variant"), row.get("calib"))


def fields_of(out: Path, rows: list[dict]) -> list[str]:
    """The CSV columns the target already has (new keys of the rows are added at the end)."""
    path = out.with_suffix(".csv")
    fields = next(csv.reader(path.open()), []) if path.is_file() else []
    for r in rows:
        fields += [k for k in r if k not in fields and r[k] is not None
                   and not isinstance(r[k], (list, dict))]
    return fields


def superseded_path(into: Path) -> Path:
    """Where the rows replaced in ``into`` are kept: out of the current results, in archive/."""
    return into.parent / "archive" / f"{into.name}_superseded"


def merge(src: Path, into: Path, note: str | None) -> list[tuple]:
    """Merge and return the keys of the rows that replaced one."""
    new = load_rows(src.with_suffix(""))
    if not new:
        raise SystemExit(f"{src}: no rows to merge")
    keys = {key(r) for r in new}
    if len(keys) != len(new):
        raise SystemExit(f"{src}: two rows for one setting; merge one of them")
    if note:
        for r in new:
            r["note"] = note
    old = load_rows(into)
    replaced = [r for r in old if key(r) in keys]
    kept = [r for r in old if key(r) not in keys]
    save_rows(into, kept + new, fields_of(into, new))
    if replaced:
        sup = superseded_path(into)
        sup.parent.mkdir(parents=True, exist_ok=True)
        for r in replaced:
            r["superseded_by"] = next(n.get("command", "") for n in new if key(n) == key(r))
        save_rows(sup, load_rows(sup) + replaced, fields_of(sup, replaced))
    return [key(r) for r in replaced]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="results JSON of the separate run")
    ap.add_argument("--into", type=Path, required=True,
                    help="committed results file, without suffix (e.g. benchmarks/results/rapq)")
    ap.add_argument("--note", default=None, help="text for the rows' note column")
    args = ap.parse_args()
    for k in merge(args.src, args.into.with_suffix(""), args.note):
        print(f"replaced (kept in {superseded_path(args.into.with_suffix(''))}):", *[x for x in k if x is not None])


if __name__ == "__main__":
    main()
