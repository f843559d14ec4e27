"""Seconds per image of the integer reference and the bit-exact simulation, to compare changes
to their arithmetic on one machine (CPU seconds of the process, and wall seconds).

The model gets random weights and random calibration images (the values do not change the
work), the quantization points and a uniform config. To compare with another checkout, run
this script with ``PYTHONPATH`` set to that checkout: each line records the commit of the
lowbit it imported.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/integer_speed.py \\
        --model mobilenet_v2_tflite --configs w8a8 w4a8 --batch 1 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, provenance  # noqa: E402

CONFIGS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}


def seconds_per_image(fn, x, reps: int) -> tuple[float, float]:
    """The fastest of ``reps`` runs, per image: CPU seconds of this process (what the work
    costs, little moved by other jobs on a shared machine) and wall seconds."""
    fn(x[:1])  # warm-up
    cpu = wall = float("inf")
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn(x)
        cpu = min(cpu, time.process_time() - c0)
        wall = min(wall, time.perf_counter() - w0)
    return cpu / len(x), wall / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2_tflite", choices=list(MODELS))
    ap.add_argument("--configs", nargs="+", default=["w8a8", "w4a8"], choices=list(CONFIGS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3, help="the fastest of this many runs counts")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    import lowbit
    from lowbit.export import bit_exact
    from lowbit.export.integer import IntegerModel
    from lowbit.models import get_model
    from lowbit.nn.points import insert_points

    torch.set_num_threads(args.threads)
    where = provenance(Path(lowbit.__file__).resolve().parent.parent)
    for name in args.configs:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_model(args.model)
        x = torch.randn(max(args.batch) + 4, 3, args.size, args.size)
        q = lowbit.prepare(model, lowbit.QuantConfig.uniform(*CONFIGS[name]), x[:1])
        q, _ = insert_points(q)
        lowbit.calibrate(q, [x[-4:]], progress=False)
        runners = {"integer": IntegerModel(q).run, "bit_exact": bit_exact(q)}
        for b in args.batch:
            load = os.getloadavg()[0]
            times = {k: seconds_per_image(fn, x[:b], args.reps) for k, fn in runners.items()}
            parts = ", ".join(f"{k} {cpu:.3f} s/image CPU ({wall:.3f} wall)"
                              for k, (cpu, wall) in times.items())
            print(f"{args.model} {name} batch {b}: {parts} ({args.threads} thread(s), load "
                  f"{load:.1f}, commit {where['commit']})", flush=True)


if __name__ == "__main__":
    main()
