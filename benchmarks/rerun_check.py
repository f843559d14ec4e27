"""Did a refactor keep the published numbers? Re-run rows against the committed ones.

Each re-run results file (written by the benchmark's own ``--out``) is matched row by row with
the committed file it reproduces, on the columns that define a run; the output lists both
top-1 figures, their difference and the commits. Results: benchmarks/results/rerun_check.json.

    python benchmarks/rerun_check.py --pair /tmp/runs/rerun_r20.json benchmarks/results/rapq.json \
        rapq "main 074436c"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_configs import row_config  # noqa: E402
from common import RESULTS, load_rows, save_rows  # noqa: E402

KEYS = {
    "rapq": ("model", "config", "w_bits", "a_bits", "iters", "protocol_name"),
    "qat": ("run", "method", "stages", "epochs_per_stage", "augment"),
    "sdq": ("arm", "bits", "a_bits", "epochs", "search_steps"),
}
FIELDS = ["kind", "key", "code", "committed_top1", "rerun_top1", "difference",
          "committed_commit", "rerun_commit", "rerun_file"]


def _key(row: dict, kind: str) -> tuple:
    row = {**row, "config": row_config(row)} if kind == "rapq" else row
    if kind == "rapq" and not row.get("protocol_name"):
        row["protocol_name"] = "imagenette"
    return tuple(row.get(k) for k in KEYS[kind])


def _rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def compare(rerun: Path, committed: Path, kind: str, code: str) -> list[dict]:
    old = {_key(r, kind): r for r in _rows(committed)}
    out = []
    for r in _rows(rerun):
        k = _key(r, kind)
        c = old.get(k)
        if c is None:
            want = dict(zip(KEYS[kind], k, strict=True))
            raise SystemExit(f"{rerun}: no committed row in {committed} for {want}")
        out.append(dict(kind=kind, key=dict(zip(KEYS[kind], k, strict=True)), code=code,
                        committed_top1=c["top1"], rerun_top1=r["top1"],
                        difference=r["top1"] - c["top1"], committed_commit=c.get("commit"),
                        rerun_commit=r.get("commit"), rerun_file=str(committed.name)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", nargs=4, action="append",
                    metavar=("RERUN", "COMMITTED", "KIND", "CODE"), required=True,
                    help=f"KIND is one of {sorted(KEYS)}; CODE says which code the re-run ran "
                    "(e.g. 'main 074436c'), since some benchmarks record no commit")
    ap.add_argument("--out", default=str(RESULTS / "rerun_check"))
    args = ap.parse_args()
    out = Path(args.out)
    rows = load_rows(out)
    def ident(r):
        return json.dumps([r["key"], r["code"]], sort_keys=True)

    for rerun, committed, kind, code in args.pair:
        new = compare(Path(rerun), Path(committed), kind, code)
        keys = {ident(r) for r in new}
        rows = [r for r in rows if ident(r) not in keys] + new
        for r in new:
            print(f"{r['key']} ({code}): committed {r['committed_top1']:.2f}, re-run {r['rerun_top1']:.2f} "
                  f"({r['difference']:+.2f})")
    save_rows(out, rows, FIELDS)


if __name__ == "__main__":
    main()
