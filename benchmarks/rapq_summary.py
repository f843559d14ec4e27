"""One table for the RAPQ targets: per model and setting, the top-1 of each method.

    python benchmarks/rapq_summary.py            # markdown, as in BENCHMARKS.md

Reads the committed rows (rapq.json, then rapq_gpu.json where the CPU has no row of that
method, brevitas_pot.json, and the float top-1 of ptq_baseline.json). Where several rows of a
method exist, the plain method's row is shown; where it has none, the best row of another of
its configs (such as rapq-dw-rs, benchmarks/configs/), named, so every cell names the row it
comes from; markers say which
rows ran on the GPU, before the exponent search, with learned activation scales before the
fix of their gradients, or with the current rounding learning rate (docs/notes/rapq.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_configs import bias_corrected, row_config  # noqa: E402
from common import MODELS, RESULTS  # noqa: E402
from rapq import SETTINGS  # noqa: E402
from report import unpadded  # noqa: E402

from lowbit.report import format_table  # noqa: E402

COLUMNS = {"pot": "naive PoT", "rapq-quick": "RAPQ quick", "rapq": "RAPQ full",
           "brecq": "float-scale recon."}
OLD = "before c3a1f22"  # the note of rows measured before the exponent search
# From this commit on, learned per-tensor activation scales get the right gradients with a
# negative zero-point (lowbit.ptq.reconstruct.TrainableQuant); rapq-quick, brecq and rapq with
# quick steps learn them.
GRAD_FIX = "2ffa2ca"


@cache
def _has_fix(commit: str | None) -> bool:
    if not commit:
        return False  # rows without a commit predate 738bb4a
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", "-C", str(root), "merge-base", "--is-ancestor", GRAD_FIX,
                           commit.removesuffix("+dirty")], capture_output=True)
    return done.returncode == 0


def learned_before_fix(row: dict) -> bool:
    """Whether ``row`` learned activation scales with the gradients fixed in GRAD_FIX."""
    base = row["method"].split("+")[0]
    learns = base in {"rapq-quick", "brecq"} or (base == "rapq" and (row.get("quick_iters") or 0) > 0)
    return learns and not _has_fix(row.get("commit"))


def rows(name: str) -> list[dict]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def cell(candidates: list[dict]) -> str:
    if not candidates:
        return ""
    plain = [r for r in candidates if row_config(r) == r["method"].split("+")[0]]
    best = max(plain or candidates, key=lambda r: r["top1"])
    name = row_config(best)
    marks = (("ᴳ" if best.get("device", "cpu") != "cpu" else "")
             + ("*" if OLD in (best.get("note") or "") else "")
             + ("†" if learned_before_fix(best) else "")
             + ("§" if best.get("lr_round") else ""))
    return f"{best['top1']:.2f}{marks}" + ("" if plain else f" ({name})")


def select(src: list[dict], model: str, w: int, a: int, base: str) -> list[dict]:
    """The rows of one method (any config but bias-corrected ones) at one model and setting."""
    return [r for r in src if r["model"] == model and (r["w_bits"], r["a_bits"]) == (w, a)
            and r["method"].split("+")[0] == base and not bias_corrected(r)]


def table() -> list[dict]:
    cpu, gpu = rows("rapq"), rows("rapq_gpu")
    brev = [dict(r, method="brevitas") for r in rows("brevitas_pot")]
    floats = {r["model"]: r["top1"] for r in rows("ptq_baseline") if r["method"] == "float"}
    out = []
    for m in MODELS:
        for w, a in SETTINGS.values():
            line = {"model": m, "W/A": f"W{w}A{a}", "float": floats.get(m)}
            for base, title in COLUMNS.items():
                line[title] = cell(select(cpu, m, w, a, base) or select(gpu, m, w, a, base))
            line["Brevitas PoT"] = cell(select(brev, m, w, a, "brevitas"))
            out.append(line)
    return out


def main() -> None:
    print(unpadded(format_table(table(), ["model", "W/A", "float", *COLUMNS.values(),
                                          "Brevitas PoT"], markdown=True)))
    print("\nᴳ: GPU row (rapq_gpu.json); *: measured before the exponent search; "
          "†: learned activation scales measured before their gradient fix; "
          "§: the default rounding learning rate min(0.1, 30 / steps) (unmarked reconstruction "
          "rows ran the old 3e-3); "
          "config in brackets (only where the plain method has no row): benchmarks/configs/; "
          "bias-corrected rows left out. What each change was: docs/notes/rapq.md.")


if __name__ == "__main__":
    main()
