"""RAPQ (power-of-two PTQ) against naive PoT and float-scale reconstruction, per model and setting.

Each method with its options is a named config under benchmarks/configs/ (README there: which
config reproduces which committed row). Each (model, setting, config) runs in its own process so that wall time and peak memory
(max RSS) belong to that run alone; the load average at the start is recorded because other
jobs may share the cores. Results: benchmarks/results/rapq.{csv,json}.

    python benchmarks/rapq.py --models resnet20 --settings W4A4 W2A4
    python benchmarks/rapq.py --models mobilenet_v2_tflite --configs pot rapq-quick rapq \\
        --iters 300 --settings W4A4
    python benchmarks/rapq.py --models mobilenet_v2_tflite --configs pot-bc --settings W4A8
    python benchmarks/rapq.py --models mobilenet_v2_tflite --configs rapq-dw brecq-dw --settings W4A4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_configs import config_names, load_recipe, row_config  # noqa: E402
from common import (  # noqa: E402
    MODELS,
    PROTOCOLS,
    RESULTS,
    load_rows,
    protocol_data,
    provenance,
    run_child,
    save_rows,
    weights,
)

SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W2A4": (2, 4)}
DEFAULT_CONFIGS = ["pot", "rapq-quick", "rapq", "brecq"]
FIELDS = ["model", "method", "config", "protocol_name", "diversify", "w_bits", "a_bits", "top1", "top5", "agreement",
          "sqnr_db", "float_top1", "drop", "drop_se", "iters", "round_weight", "lr_round", "recon_batch_size", "learn_a_scale", "quick_iters", "quick_batch_size", "bn_guided", "quick_naive_error",
          "quick_adjusted_error", "recon_error_before", "recon_error_after", "recon_kept",
          "eval_images", "calib_images", "seconds_calibrate", "seconds_quick", "seconds_cache",
          "seconds_reconstruct", "seconds_bias_correction", "ptq_seconds", "eval_seconds", "wall_seconds", "peak_rss_mib",
          "load_avg_start", "threads", "device", "peak_gpu_mib", "protocol", "torch", "commit", "command", "note"]


def one(model: str, name: str, w_bits: int, a_bits: int, args) -> dict:
    """Run config ``name`` at one setting in this process and return its row."""
    import torch

    from lowbit import evaluate, ptq
    from lowbit.models import get_model

    torch.manual_seed(0)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    recipe = load_recipe(name)
    data = protocol_data(model, args.protocol, calib_size=args.calib_size,
                         eval_size=args.eval_size, batch_size=args.batch_size,
                         workers=args.workers)
    device = torch.device(args.device)
    if device.type == "cuda":
        # float32 arithmetic, as on the CPU (torch lets cuDNN use TF32 by default), so GPU
        # rows compare with CPU rows
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    net = get_model(model, weights(model)).to(device, memory_format=torch.channels_last)
    mc = recipe.build(iters=args.iters, round_weight=args.round_weight, lr_round=args.lr_round,
                      batch_size=args.recon_batch_size,
                      learn_a_scale=True if args.learn_a_scale else None,
                      quick_iters=args.quick_iters, quick_batch_size=args.quick_batch_size)
    opts = mc.to_dict()
    t = time.perf_counter()
    q = ptq(net, mc, data.calib, recipe.quant_config(w_bits, a_bits), data.example,
            progress=False)
    ptq_seconds = time.perf_counter() - t
    if args.save:
        from lowbit.pipeline import save_quantized

        folder = Path(args.save) / f"{model}-{name}-W{w_bits}A{a_bits}-{args.protocol}"
        save_quantized(q, folder, {"model": model, "weights": str(weights(model)),
                                   "method": mc.method, "method_config": opts,
                                   "protocol": data.protocol})
    t = time.perf_counter()
    res = evaluate(q, data.eval, reference=net, progress=False)
    eval_seconds = time.perf_counter() - t
    rinfo = q.lowbit_rapq
    cov = q.lowbit_report.calib_coverage
    quick = rinfo.get("quick", {})
    recon = rinfo.get("reconstruction", {})
    return dict(
        model=model, method=mc.method, config=name, method_config=opts, w_bits=w_bits,
        a_bits=a_bits, top1=res.top1, top5=res.top5,
        agreement=res.agreement, sqnr_db=res.sqnr_db, float_top1=res.reference_top1,
        drop=res.reference_top1 - res.top1, drop_se=res.delta_se, protocol_name=args.protocol,
        calib_coverage=cov.to_dict() if cov is not None else None,
        diversify=rinfo.get("diversify"), iters=opts.get("iters"), round_weight=opts.get("round_weight"),
        lr_round=rinfo.get("lr_round"),
        recon_batch_size=opts.get("batch_size"), learn_a_scale=opts.get("learn_a_scale"),
        quick_iters=opts.get("quick_iters"), quick_batch_size=opts.get("quick_batch_size"),
        bn_guided=rinfo.get("bn_guided"),
        quick_naive_error=quick.get("naive_error"), quick_adjusted_error=quick.get("adjusted_error"),
        recon_error_before=recon.get("error_before"), recon_error_after=recon.get("error_after"),
        recon_kept=recon.get("kept"), eval_images=res.samples, calib_images=rinfo["calib_images"],
        seconds_calibrate=rinfo.get("seconds_calibrate"), seconds_quick=quick.get("seconds"),
        seconds_cache=rinfo.get("seconds_cache"),
        seconds_reconstruct=rinfo.get("seconds_reconstruct"),
        seconds_bias_correction=rinfo.get("seconds_bias_correction"), ptq_seconds=ptq_seconds,
        eval_seconds=eval_seconds, wall_seconds=time.perf_counter() - t0,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        load_avg_start=load, threads=torch.get_num_threads(), protocol=data.protocol,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        peak_gpu_mib=(torch.cuda.max_memory_allocated(device) / 2**20
                      if device.type == "cuda" else None),
        units=rinfo.get("units"),
        pot_rescale=rinfo.get("pot_rescale"),
        **provenance(),
    )


def parser() -> argparse.ArgumentParser:
    """The command line; also the source of defaults for scripts that call :func:`one`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20"], choices=list(MODELS))
    ap.add_argument("--configs", "--config", nargs="+", default=DEFAULT_CONFIGS,
                    choices=config_names(), metavar="NAME",
                    help="named configs under benchmarks/configs/ (e.g. rapq-dw-rs; default: "
                    + " ".join(DEFAULT_CONFIGS) + ")")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--iters", type=int, default=None,
                    help="reconstruction steps per block (default: the config's, 1000)")
    ap.add_argument("--round-weight", type=float, default=None,
                    help="weight of AdaRound's rounding penalty (default: the library's, "
                    "ReconOptions.round_weight)")
    ap.add_argument("--lr-round", type=float, default=None,
                    help="Adam learning rate of the rounding variables (default: the library's, "
                    "ReconOptions.lr_round)")
    ap.add_argument("--recon-batch-size", type=int, default=None,
                    help="images per reconstruction step (default: the library's, "
                    "ReconOptions.batch_size)")
    ap.add_argument("--learn-a-scale", action="store_true",
                    help="learn activation scales during reconstruction, power-of-two ones "
                    "as log2 exponents rounded in the forward pass (ReconOptions.learn_a_scale; "
                    "default: float scales only)")
    ap.add_argument("--quick-iters", type=int, default=None,
                    help="scale-adjustment steps (default: the library's, 300 for rapq-quick "
                    "and 0 for rapq)")
    ap.add_argument("--quick-batch-size", type=int, default=None,
                    help="images per scale-adjustment step (default: the config's, 32; fewer: "
                    "faster on 224 px models)")
    ap.add_argument("--protocol", default="imagenette", choices=PROTOCOLS,
                    help="224 px models: where calibration and evaluation images come from "
                    "(benchmarks/common.py); CIFAR models ignore it")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="torch device for the model and the PTQ (cuda: the GPU; rows record it)")
    ap.add_argument("--workers", type=int, default=2,
                    help="image-decoding processes for the 224 px datasets")
    ap.add_argument("--out", default=str(RESULTS / "rapq"))
    ap.add_argument("--save", default=None, metavar="DIR",
                    help="also save each quantized model (as 'lowbit ptq --save' does) to "
                    "DIR/MODEL-CONFIG-WxAy-PROTOCOL, e.g. for export_bench.py --quantized")
    ap.add_argument("--one", nargs=4, metavar=("MODEL", "CONFIG", "W", "A"), help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser().parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        m, meth, w, a = args.one
        print("ROW " + json.dumps(one(m, meth, int(w), int(a), args)))
        return
    out = Path(args.out)
    common = [*(["--iters", str(args.iters)] if args.iters is not None else []),
              *(["--quick-iters", str(args.quick_iters)] if args.quick_iters is not None else []),
              *(["--round-weight", str(args.round_weight)] if args.round_weight is not None else []),
              *(["--lr-round", str(args.lr_round)] if args.lr_round is not None else []),
              *(["--recon-batch-size", str(args.recon_batch_size)]
                if args.recon_batch_size is not None else []),
              *(["--learn-a-scale"] if args.learn_a_scale else []),
              *(["--quick-batch-size", str(args.quick_batch_size)]
                if args.quick_batch_size is not None else []),
              "--protocol", args.protocol,
              "--calib-size", str(args.calib_size), "--batch-size", str(args.batch_size),
              "--threads", str(args.threads)]
    if args.device != "cpu":
        common += ["--device", args.device, "--workers", str(args.workers)]
    if args.eval_size:
        common += ["--eval-size", str(args.eval_size)]
    extra = ["--save", args.save] if args.save else []
    for m in args.models:
        for s in args.settings:
            w, a = SETTINGS[s]
            for name in args.configs:
                cmd = [sys.executable, __file__, "--one", m, name, str(w), str(a), *common,
                       *extra]
                row = run_child(cmd, f"{m} {name} W{w}A{a}")
                if row is None:
                    return
                row["command"] = ("python benchmarks/rapq.py --models " + m + " --configs " + name
                                  + " --settings " + s + " " + " ".join(common))
                key = (m, name, w, a, args.protocol)
                rows = [r for r in load_rows(out)
                        if (r["model"], row_config(r), r["w_bits"], r["a_bits"],
                            r.get("protocol_name", "imagenette")) != key] + [row]
                save_rows(out, rows, FIELDS)
                print(f"{m:<20} {name:<11} {s} {args.protocol}  top-1 {row['top1']:.2f} "
                      f"(float {row['float_top1']:.2f}, drop {row['drop']:.2f} "
                      f"+- {row['drop_se']:.2f})  "
                      f"(ptq {row['ptq_seconds']:.0f} s, wall {row['wall_seconds']:.0f} s, "
                      f"{row['peak_rss_mib']:.0f} MiB, load {row['load_avg_start']:.1f})",
                      flush=True)



if __name__ == "__main__":
    main()
