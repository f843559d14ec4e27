"""Seconds per unit of block reconstruction, to compare changes to its loop on one machine.

Runs ``rapq`` or ``brecq`` with a few reconstruction steps per unit and no exponent search on
random calibration images (the values do not change the work, so only the model's weights
are needed). To compare with another checkout, run this script with ``PYTHONPATH`` set to
that checkout: each row records the commit of the lowbit it imported.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/recon_speed.py --model mobilenet_v2_tflite \\
        --configs rapq brecq --steps 20
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=/path/to/older/checkout python benchmarks/recon_speed.py ...
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_configs import load_recipe  # noqa: E402
from common import MODELS, RESULTS, load_rows, provenance, save_rows, weights  # noqa: E402
from rapq import SETTINGS  # noqa: E402

CONFIGS = ["rapq", "brecq", "rapq-dw", "brecq-dw", "rapq-dw-rs"]
FIELDS = ["model", "method", "config", "w_bits", "a_bits", "steps", "calib_images", "batch_size",
          "seconds_reconstruct", "seconds_total", "peak_rss_mib", "threads", "load_avg_start",
          "torch", "commit", "command"]


def reconstruct_random(model: str, name: str, w: int, a: int, args, iters: int):
    """``ptq`` with config ``name`` (a rapq or brecq recipe of benchmarks/configs/) on
    ``args.calib`` random images, no exponent search: the work of reconstruction without the
    dataset."""
    import torch

    from lowbit import ptq
    from lowbit.models import get_model

    recipe = load_recipe(name)
    mc = recipe.build(iters=iters, batch_size=args.batch_size, exponent_search=False)
    net = get_model(model, weights(model)).to(memory_format=torch.channels_last).eval()
    x = torch.randn(args.calib, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    calib = [(x[i:i + 32], None) for i in range(0, args.calib, 32)]
    return ptq(net, mc, calib, recipe.quant_config(w, a), x[:2], progress=False)


def one(model: str, name: str, setting: str, args) -> dict:
    import torch

    import lowbit

    torch.manual_seed(0)
    load = os.getloadavg()[0]
    w, a = SETTINGS[setting]
    q = reconstruct_random(model, name, w, a, args, args.steps)
    info = q.lowbit_rapq
    return dict(
        model=model, method=info["method"], config=name, w_bits=w, a_bits=a, steps=args.steps,
        calib_images=args.calib, batch_size=args.batch_size,
        seconds_reconstruct=info["seconds_reconstruct"], seconds_total=info["seconds_total"],
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        threads=torch.get_num_threads(), load_avg_start=load,
        units={u["name"]: round(u["seconds"], 3) for u in info["units"]},
        **provenance(Path(lowbit.__file__).resolve().parent.parent),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2_tflite", choices=list(MODELS))
    ap.add_argument("--configs", "--config", nargs="+", default=["rapq", "brecq"],
                    choices=CONFIGS, metavar="NAME",
                    help="rapq or brecq configs of benchmarks/configs/: " + ", ".join(CONFIGS))
    ap.add_argument("--setting", default="W4A4", choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=20, help="reconstruction steps per unit")
    ap.add_argument("--calib", type=int, default=64, help="random calibration images")
    ap.add_argument("--size", type=int, default=224, help="image side (32 for CIFAR models)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "recon_speed"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    for name in args.configs:
        row = one(args.model, name, args.setting, args)
        row["command"] = (f"python benchmarks/recon_speed.py --model {args.model} --configs "
                          f"{name} --setting {args.setting} --steps {args.steps} --calib "
                          f"{args.calib} --size {args.size} --threads {args.threads}")
        rows = load_rows(out) + [row]
        save_rows(out, rows, FIELDS)
        print(f"{args.model} {name} {args.setting} at {row['commit']}: reconstruction "
              f"{row['seconds_reconstruct']:.1f} s, total {row['seconds_total']:.1f} s "
              f"(load {row['load_avg_start']:.1f})", flush=True)


if __name__ == "__main__":
    main()
