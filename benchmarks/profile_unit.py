"""Where one unit's reconstruction step spends its time: torch profiler, operators by self time.

Runs a ``rapq`` or ``brecq`` config of benchmarks/configs/ (e.g. ``rapq-dw-rs``) on random
calibration images; every unit but ``--unit`` gets one step, ``--unit`` gets three warm-up
steps and then ``--steps`` profiled ones. Rows record the commit of the lowbit they imported,
so an older checkout can be profiled through ``PYTHONPATH``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_unit.py --model mobilenet_v2_tflite \\
        --unit features.2 --config rapq-dw-rs --setting W2A4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, RESULTS, load_rows, provenance, save_rows  # noqa: E402
from rapq import SETTINGS  # noqa: E402
from recon_speed import CONFIGS, reconstruct_random  # noqa: E402

FIELDS = ["model", "config", "w_bits", "a_bits", "unit", "steps", "batch_size",
          "seconds_per_step", "threads", "load_avg_start", "torch", "commit",
          "command"]


def one(args) -> dict:
    import torch

    import lowbit
    import lowbit.ptq.reconstruct  # noqa: F401  (the module, not lowbit.ptq's function)

    recon = sys.modules["lowbit.ptq.reconstruct"]
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    w, a = SETTINGS[args.setting]
    result: dict = {}
    optimise = recon._optimise_unit

    def profiled(unit, q_args, target, opts, *, pot, bn, name):
        def run(iters):
            o = dataclasses.replace(opts, iters=iters)
            optimise(unit, q_args, target, o, pot=pot, bn=bn, name=name)

        if name != args.unit:
            return run(1)
        run(3)
        t = time.perf_counter()
        with torch.profiler.profile() as prof:
            run(args.steps)
        result["seconds_per_step"] = (time.perf_counter() - t) / args.steps
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        result["top_ops"] = [
            {"op": e.key, "calls_per_step": e.count / args.steps,
             "ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
             "share": e.self_cpu_time_total / total}
            for e in events[:args.top]
        ]

    recon._optimise_unit = profiled
    reconstruct_random(args.model, args.config, w, a, args, iters=1)
    if "seconds_per_step" not in result:
        raise SystemExit(f"no unit named {args.unit!r} was reconstructed")
    return dict(
        model=args.model, config=args.config, w_bits=w, a_bits=a, unit=args.unit,
        steps=args.steps, batch_size=args.batch_size, **result,
        threads=torch.get_num_threads(), load_avg_start=load,
        **provenance(Path(lowbit.__file__).resolve().parent.parent),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2_tflite", choices=list(MODELS))
    ap.add_argument("--unit", default="features.2", help="the unit to profile")
    ap.add_argument("--config", default="rapq-dw-rs", choices=CONFIGS,
                    help="a rapq or brecq config of benchmarks/configs/")
    ap.add_argument("--setting", default="W2A4", choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=10, help="profiled steps")
    ap.add_argument("--calib", type=int, default=64, help="random calibration images")
    ap.add_argument("--size", type=int, default=224, help="image side (32 for CIFAR models)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per step")
    ap.add_argument("--top", type=int, default=12, help="operators kept in the row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "profile_unit"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    row = one(args)
    row["command"] = (f"python benchmarks/profile_unit.py --model {args.model} --unit "
                      f"{args.unit} --config {args.config} --setting {args.setting} --steps "
                      f"{args.steps} --threads {args.threads}")
    out = Path(args.out)
    save_rows(out, load_rows(out) + [row], FIELDS)
    print(f"{args.model} {args.unit} {args.config} {args.setting} at {row['commit']}: "
          f"{row['seconds_per_step']:.3f} s per step", flush=True)
    for op in row["top_ops"]:
        print(f"  {op['op'][:60]:<60} {op['ms_per_step']:8.1f} ms  {100 * op['share']:5.1f} %")


if __name__ == "__main__":
    main()
