"""Seconds per unit of block reconstruction, to compare changes to its loop on one machine.

Runs ``rapq`` or ``brecq`` with a few reconstruction steps per unit and no exponent search on
random calibration images (the values do not change the work, so only the model's weights
are needed). To compare with another checkout, run this script with ``PYTHONPATH`` set to
that checkout: each row records the commit of the lowbit it imported.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/recon_speed.py --model mobilenet_v2_tflite \\
        --methods rapq brecq --steps 20
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=/path/to/older/checkout python benchmarks/recon_speed.py ...
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, RESULTS, load_rows, provenance, save_rows, weights  # noqa: E402
from rapq import SETTINGS  # noqa: E402

METHODS = ["rapq", "brecq", "rapq+dw", "brecq+dw", "rapq+dw+rs"]
FIELDS = ["model", "method", "w_bits", "a_bits", "steps", "calib_images", "batch_size",
          "seconds_reconstruct", "seconds_total", "peak_rss_mib", "threads", "load_avg_start",
          "torch", "commit", "command"]


def reconstruct_random(model: str, method: str, w: int, a: int, args, iters: int):
    """``ptq`` with ``method`` (``rapq``/``brecq``, ``+dw`` / ``+rs`` flags) on ``args.calib``
    random images, no exponent search: the work of reconstruction without the dataset."""
    import torch

    from lowbit import QuantConfig, ptq
    from lowbit.models import get_model

    base, *flags = method.split("+")
    opts = {"pot_rescale": "depthwise"} if "rs" in flags else {}
    net = get_model(model, weights(model)).to(memory_format=torch.channels_last).eval()
    x = torch.randn(args.calib, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    calib = [(x[i:i + 32], None) for i in range(0, args.calib, 32)]
    config = QuantConfig.uniform(w, a, dw_act_per_channel="dw" in flags)
    return ptq(net, base, calib, config, x[:2], progress=False, iters=iters,
               batch_size=args.batch_size, exponent_search=False, **opts)


def one(model: str, method: str, setting: str, args) -> dict:
    import torch

    import lowbit

    torch.manual_seed(0)
    load = os.getloadavg()[0]
    w, a = SETTINGS[setting]
    q = reconstruct_random(model, method, w, a, args, args.steps)
    info = q.lowbit_rapq
    return dict(
        model=model, method=method, w_bits=w, a_bits=a, steps=args.steps,
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
    ap.add_argument("--methods", nargs="+", default=["rapq", "brecq"], choices=METHODS,
                    help="rapq or brecq, optionally with benchmarks/rapq.py's flags +dw "
                    "(per-channel depthwise inputs) and +rs (rescaled conv -> ReLU6 -> "
                    "depthwise pairs, rapq only)")
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
    for method in args.methods:
        row = one(args.model, method, args.setting, args)
        row["command"] = (f"python benchmarks/recon_speed.py --model {args.model} --methods "
                          f"{method} --setting {args.setting} --steps {args.steps} --calib "
                          f"{args.calib} --size {args.size} --threads {args.threads}")
        rows = load_rows(out) + [row]
        save_rows(out, rows, FIELDS)
        print(f"{args.model} {method} {args.setting} at {row['commit']}: reconstruction "
              f"{row['seconds_reconstruct']:.1f} s, total {row['seconds_total']:.1f} s "
              f"(load {row['load_avg_start']:.1f})", flush=True)


if __name__ == "__main__":
    main()
