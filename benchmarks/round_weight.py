"""Learned rounding: penalty weight and learning rate against reconstruction steps (full RAPQ).

    python benchmarks/round_weight.py --model resnet20 --setting W2A4 --iters 300 1000 \
        --round-weights 0.01 0.1 1 10
    python benchmarks/round_weight.py --model resnet20 --setting W2A4 --iters 300 1000 \
        --round-weights 0.01 --lr-rounds 0.003 0.01 0.03 0.1

Each configuration runs in its own process, as benchmarks/rapq.py runs its rows (same data,
split, seed and options), and records, per unit, the error of each of the three candidates a
unit can end in (start, searched exponents, reconstruction). Results:
benchmarks/results/round_weight.{csv,json}; a configuration already there is replaced. The
sweep behind the default rounding learning rate is archived in
benchmarks/results/archive/round_weight.json (rows without ``lr_round`` ran 3e-3 there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rapq  # noqa: E402
from common import MODELS, RESULTS, load_rows, run_child, save_rows  # noqa: E402
from rapq import SETTINGS  # noqa: E402

OLD_LR_ROUND = 3e-3  # the default of ReconOptions.lr_round before the rows recorded it

FIELDS = ["model", "setting", "iters", "round_weight", "lr_round", "top1", "agreement", "error_before",
          "error_after", "units_kept_reconstruction", "ptq_seconds", "threads",
          "load_avg_start", "torch", "commit", "command"]


def one(model: str, setting: str, iters: int, round_weight: float, lr_round: float,
        threads: int) -> dict:
    """One row of benchmarks/rapq.py (method ``rapq``, its defaults), reduced to the sweep's
    columns."""
    import torch

    torch.set_num_threads(threads)
    w, a = SETTINGS[setting]
    args = rapq.parser().parse_args([])
    args.iters, args.round_weight, args.lr_round = iters, round_weight, lr_round
    row = rapq.one(model, "rapq", w, a, args)
    units = [{"name": u["name"], "kept": u["kept"], **u["candidates"]} for u in row["units"]]
    return dict(model=model, setting=setting, iters=iters, round_weight=round_weight,
                lr_round=lr_round,
                top1=row["top1"], agreement=row["agreement"],
                error_before=row["recon_error_before"], error_after=row["recon_error_after"],
                units_kept_reconstruction=sum(u["kept"] == "reconstruction" for u in units),
                units=units, ptq_seconds=row["ptq_seconds"], threads=threads,
                load_avg_start=row["load_avg_start"], torch=row["torch"], commit=row["commit"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", choices=list(MODELS))
    ap.add_argument("--setting", default="W2A4", choices=list(SETTINGS))
    ap.add_argument("--iters", nargs="+", type=int, default=[300, 1000],
                    help="reconstruction steps per unit")
    ap.add_argument("--round-weights", nargs="+", type=float, default=[0.01, 0.1, 1.0],
                    help="weights of the rounding penalty")
    ap.add_argument("--lr-rounds", nargs="+", type=float, default=[OLD_LR_ROUND],
                    help="Adam learning rates of the rounding variables (default 3e-3, the "
                    "library default the first rows ran; the library's is now min(0.1, 30/iters))")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "round_weight"))
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.model, args.setting, args.iters[0],
                                      args.round_weights[0], args.lr_rounds[0], args.threads)))
        return
    out = Path(args.out)
    for iters, rw, lr in itertools.product(args.iters, args.round_weights, args.lr_rounds):
        opts = ["--model", args.model, "--setting", args.setting, "--iters", str(iters),
                "--round-weights", str(rw), "--lr-rounds", str(lr),
                "--threads", str(args.threads)]
        row = run_child([sys.executable, __file__, "--one", *opts],
                        f"{args.model} {args.setting} iters {iters} round weight {rw} lr {lr}")
        if row is None:
            return
        row["command"] = "python benchmarks/round_weight.py " + " ".join(opts)
        rows = [r for r in load_rows(out) if _key(r) != _key(row)]
        save_rows(out, rows + [row], FIELDS)
        print(f"{args.model} {args.setting} iters {iters:>5} round weight {rw:<6} lr {lr:<6} "
              f"top-1 {row['top1']:.2f}  error {row['error_after']:.1f}  "
              f"({row['ptq_seconds']:.0f} s)", flush=True)


def _key(row: dict) -> tuple:
    return (row["model"], row["setting"], row["iters"], row["round_weight"],
            row.get("lr_round") or OLD_LR_ROUND)


if __name__ == "__main__":
    main()
