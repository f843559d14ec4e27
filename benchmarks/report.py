"""Render a committed results JSON as a markdown table (used to write BENCHMARKS.md).

    python benchmarks/report.py benchmarks/results/ptq_baseline.json
    python benchmarks/report.py benchmarks/results/rapq.json --columns model method w_bits a_bits top1
    python benchmarks/report.py benchmarks/results/rapq.json --compact   # no padding (smaller file)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lowbit.report import format_table  # noqa: E402

BASELINE = ["model", "method", "W/A", "top1", "agreement", "sqnr_db", "size_kib", "gbitops",
            "calib_seconds", "eval_seconds", "wall_seconds", "peak_rss_mib"]
ORDER = {"float-full": -1, "float": 0, "minmax": 1, "percentile": 2, "mse": 3, "pot": 4,
         "rapq-quick": 5, "rapq": 6, "brecq": 7}


def unpadded(table: str) -> str:
    """A markdown table without the alignment padding: renders the same, takes far less space."""
    out = []
    for line in table.splitlines():
        if set(line) <= set("|-"):
            out.append("|" + "|".join(" --- " for _ in line.strip("|").split("|")) + "|")
        else:
            out.append(re.sub(r" +\|", " |", line))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--columns", nargs="+", default=None)
    ap.add_argument("--compact", action="store_true", help="no alignment padding")
    args = ap.parse_args()
    data = json.loads(Path(args.path).read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    if rows and "w_bits" in rows[0] and "method" in rows[0]:
        rows.sort(key=lambda r: (r["model"], -r["w_bits"], -r["a_bits"],
                                 ORDER.get(r["method"].split("+")[0], 9),
                                 r.get("config") or r["method"]))
        for r in rows:
            r["W/A"] = ("32/32" if str(r["method"]).startswith("float")
                        else f"W{r['w_bits']}A{r['a_bits']}")
    table = format_table(rows, args.columns or BASELINE, markdown=True)
    print(unpadded(table) if args.compact else table)


if __name__ == "__main__":
    main()
