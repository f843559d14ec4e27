"""Float accuracy and baseline PTQ (min-max / percentile / MSE) per model and bit setting.

Each (model, setting, method) runs in its own process so that wall time and peak memory
(max RSS) belong to that run alone. Results: benchmarks/results/ptq_baseline.{csv,json}.

    python benchmarks/ptq_baseline.py                       # every model, W8A8/W4A8/W4A4
    python benchmarks/ptq_baseline.py --models resnet20 --methods minmax percentile mse
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODELS,
    PROTOCOLS,
    RESULTS,
    data_root,
    load_rows,
    protocol_data,
    provenance,
    run_child,
    save_rows,
    weights,
)

SETTINGS = [(8, 8), (4, 8), (4, 4)]
FIELDS = ["model", "method", "protocol_name", "w_bits", "a_bits", "top1", "top5", "agreement",
          "sqnr_db", "float_top1", "drop", "drop_se", "paper_float", "eval_images", "calib_images", "size_kib", "gbitops",
          "calib_seconds", "eval_seconds", "wall_seconds", "peak_rss_mib", "protocol"]


def one(model: str, method: str, w_bits: int, a_bits: int, calib: int, batch: int,
        protocol: str = "imagenette") -> dict:
    """Run one setting in this process and return its row ('float' evaluates the float model)."""
    import torch

    from lowbit import QuantConfig, evaluate, measure, ptq
    from lowbit.models import get_model, get_spec

    torch.manual_seed(0)
    t0 = time.perf_counter()
    spec = get_spec(model)
    info = MODELS[model]
    data = protocol_data(model, protocol, calib_size=calib, batch_size=batch, workers=2)
    net = get_model(model, weights(model)).to(memory_format=torch.channels_last)
    row = dict(model=model, method=method, paper_float=info["paper_float"],
               calib_images=len(data.calib.dataset), protocol=data.protocol,
               protocol_name=protocol, threads=torch.get_num_threads(), **provenance())
    if method in ("float", "float-full"):
        loader = data.eval
        if method == "float-full":
            from lowbit.data import load_dataset, make_loader

            full = load_dataset(info["dataset"], data_root(info["dataset"]), "val",
                                mean=spec.mean, std=spec.std, resize=spec.resize or 256,
                                crop=spec.input_size[-1])
            loader = make_loader(full, batch, workers=2)
            row["protocol"] = f"{info['dataset']}/val: all {len(full)} images"
        t = time.perf_counter()
        res = evaluate(net, loader, progress=False)
        cost = measure(net, data.example)
        row.update(w_bits=32, a_bits=32, eval_seconds=time.perf_counter() - t, calib_seconds=0.0)
    else:
        t = time.perf_counter()
        q = ptq(net, method, data.calib, QuantConfig.uniform(w_bits, a_bits), data.example,
                progress=False)
        row["calib_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        res = evaluate(q, data.eval, reference=net, progress=False)
        row["eval_seconds"] = time.perf_counter() - t
        cost = measure(q, data.example)
        row.update(w_bits=w_bits, a_bits=a_bits, agreement=res.agreement, sqnr_db=res.sqnr_db,
                   float_top1=res.reference_top1, drop=res.reference_top1 - res.top1,
                   drop_se=res.delta_se)
    row.update(top1=res.top1, top5=res.top5, eval_images=res.samples,
               size_kib=cost.size_bytes / 1024, gbitops=cost.bitops / 1e9,
               wall_seconds=time.perf_counter() - t0,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=["mse"],
                    choices=["minmax", "percentile", "mse"])
    ap.add_argument("--protocol", default="imagenette", choices=PROTOCOLS,
                    help="224 px models: where calibration and evaluation images come from "
                    "(benchmarks/common.py); CIFAR models ignore it")
    ap.add_argument("--settings", nargs="+", default=[f"W{w}A{a}" for w, a in SETTINGS],
                    choices=[f"W{w}A{a}" for w, a in SETTINGS])
    ap.add_argument("--no-float", action="store_true", help="skip the float rows")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "ptq_baseline"))
    ap.add_argument("--skip-existing", action="store_true",
                    help="do not re-run settings already in the results file")
    ap.add_argument("--one", nargs=4, metavar=("MODEL", "METHOD", "W", "A"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        m, meth, w, a = args.one
        print("ROW " + json.dumps(one(m, meth, int(w), int(a), args.calib_size, args.batch_size,
                                      args.protocol)))
        return
    out = Path(args.out)
    rows = load_rows(out)
    jobs = [] if args.no_float else [(m, "float", 32, 32) for m in args.models]
    if not args.no_float and args.protocol == "imagenette":
        jobs += [(m, "float-full", 32, 32) for m in args.models
                 if MODELS[m]["dataset"] != "cifar10"]
    jobs += [(m, meth, w, a) for m in args.models for (w, a) in SETTINGS
             for meth in args.methods if f"W{w}A{a}" in args.settings]

    def key(r):
        return (r["model"], r["method"], r["w_bits"], r["a_bits"],
                r.get("protocol_name", "imagenette"))

    done = {key(r) for r in rows}
    for m, meth, w, a in jobs:
        if args.skip_existing and (m, meth, w, a, args.protocol) in done:
            continue
        cmd = [sys.executable, __file__, "--one", m, meth, str(w), str(a),
               "--calib-size", str(args.calib_size), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--protocol", args.protocol]
        row = run_child(cmd, f"{m} {meth} W{w}A{a}")
        if row is None:
            return
        row["command"] = "python benchmarks/ptq_baseline.py " + " ".join(sys.argv[1:])
        rows = [r for r in rows if key(r) != key(row)] + [row]
        save_rows(out, rows, FIELDS)
        print(f"{m:<22} {meth:<10} W{row['w_bits']}A{row['a_bits']}  top-1 {row['top1']:.2f}  "
              f"({row['wall_seconds']:.0f} s, {row['peak_rss_mib']:.0f} MiB)", flush=True)



if __name__ == "__main__":
    main()
