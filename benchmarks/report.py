"""Render a committed results JSON as a markdown table (used to write BENCHMARKS.md).

    python benchmarks/report.py benchmarks/results/ptq_baseline.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lowbit.report import format_table  # noqa: E402

COLUMNS = ["model", "method", "W/A", "top1", "agreement", "sqnr_db", "size_kib", "gbitops",
           "calib_seconds", "eval_seconds", "wall_seconds", "peak_rss_mib"]


def main(path: str) -> None:
    rows = json.loads(Path(path).read_text())["rows"]
    order = {"float-full": -1, "float": 0, "minmax": 1, "percentile": 2, "mse": 3}
    rows.sort(key=lambda r: (r["model"], -r["w_bits"], -r["a_bits"], order.get(r["method"], 9)))
    for r in rows:
        r["W/A"] = "32/32" if r["method"].startswith("float") else f"W{r['w_bits']}A{r['a_bits']}"
    print(format_table(rows, COLUMNS, markdown=True))


if __name__ == "__main__":
    main(sys.argv[1])
