"""Deployment benchmark: latency, top-1 and file size of exported models on onnxruntime.

Rows per model: float torch (eager), float onnxruntime, onnxruntime's own ``quantize_static``
(QDQ, U8S8, per channel: what a user would otherwise pick), and lowbit's exports with the
integer model's quantization points (lowbit.nn.points) calibrated after PTQ: W8A8 (8-bit
weights as uint8, exact on every CPU), W8A8 with ``int8_weights`` (U8S8 as quantize_static),
W4A8 and a power-of-two W4A8 (``--pot-method``). ``packed_kib``: the same weights packed at
their bit-width.

Latency: all sessions run round-robin (one call each, in turn, ``--reps`` rounds), so
background load hits every row alike (batch 1: three times as many rounds); median per row at batch 1 and 32, 2 threads,
OMP_WAIT_POLICY=PASSIVE; ``ms_*_vs_ort``: median of the per-round ratios to quantize_static.
Top-1 on all evaluation images: onnxruntime and the fake-quant simulation; on the first
``--int-size`` images: the integer reference, the bit-exact simulation and onnxruntime again
(``*_subset``; ``int_vs_ort_argmax``: fraction of those images where the two predict the same
class). ``drop``/``drop_se``: top-1 drop from float torch on the same images and its paired
standard error. ImageNet models run on ``--protocol diverse`` or ``narrow`` (common.py).
``one_code_frac``: the default simulation's fraction of layer-input codes one code off
the integer reference, on one batch.

    python benchmarks/export_bench.py --model resnet20 --int-size 1000 --out /tmp/runs/x/r20
    python benchmarks/export_bench.py --model mobilenet_v2_tflite --pot-method pot ...
    python benchmarks/rapq.py --models mobilenet_v2_tflite --configs rapq --settings W4A8 \
        --protocol diverse --save runs/saved     # then export that model instead of re-running:
    python benchmarks/export_bench.py --model mobilenet_v2_tflite \
        --quantized runs/saved/mobilenet_v2_tflite-rapq-W4A8-diverse
    python benchmarks/export_bench.py --model resnet20 --quick         # a short check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, protocol_data, provenance, save_rows, saved_meta, weights  # noqa: E402,E501

FIELDS = ["model", "method", "w_bits", "a_bits", "protocol_name", "top1_ort", "drop", "drop_se", "top1_sim",
          "top1_int_subset", "top1_bitexact_subset", "top1_ort_subset", "int_vs_ort_argmax",
          "one_code_frac", "ms_b1", "ms_b32", "ms_b1_vs_ort", "ms_b32_vs_ort", "size_kib",
          "packed_kib", "integer_layers", "dequantized", "eval_images", "int_images",
          "calib_images", "ptq_seconds", "load_avg"]
THREADS = 2


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_run(sess):
    return lambda x: sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _predict(fn, batches):
    import torch

    return torch.cat([torch.as_tensor(fn(x)).argmax(1) for x, _ in batches])


def _top1(pred, batches) -> float:
    import torch

    y = torch.cat([y for _, y in batches])
    return round(100.0 * float((pred == y).double().mean()), 2)


def _paired(pred, ref, batches) -> tuple[float, float]:
    """Top-1 drop of ``pred`` from ``ref`` on the same images and its paired standard error."""
    import torch

    y = torch.cat([y for _, y in batches])
    d = (ref == y).double() - (pred == y).double()
    return round(100.0 * float(d.mean()), 2), round(100.0 * float(d.std() / len(d) ** 0.5), 2)


def _round_robin(fns: dict, x, reps: int) -> dict:
    """Median latency per function, each called once per round in turn (warm-up first)."""
    for fn in fns.values():
        for _ in range(3):
            fn(x)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--calib", type=int, default=1024, help="calibration images (the diverse "
                    "protocol always takes its 650)")
    ap.add_argument("--protocol", default="diverse", choices=["diverse", "narrow"],
                    help="ImageNet models: diverse (calibrate on 650 of imagenet-val-1300, "
                    "evaluate on the other 649) or narrow (calibrate on imagenette, evaluate on "
                    "all of imagenet-val-1300)")
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--int-size", type=int, default=256, help="images for the integer reference")
    ap.add_argument("--pot-method", default="rapq", help="rapq, or pot (no reconstruction)")
    ap.add_argument("--iters", type=int, default=None, help="rapq reconstruction steps")
    ap.add_argument("--quantized", default=None, metavar="DIR",
                    help="instead of running --pot-method here, export the model saved in DIR "
                    "('lowbit ptq --save' or 'rapq.py --save'; calibrated on this protocol)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--quick", action="store_true",
                    help="200 images, 128 calibration, 30 rapq steps, 10 reps")
    ap.add_argument("--out", default=str(RESULTS / "export"))
    a = ap.parse_args()
    if a.quick:
        a.calib, a.eval_size, a.int_size, a.iters, a.reps = 128, 200, 64, 30, 10
    import onnxruntime  # noqa: F401  (fails early with the package name)
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    import lowbit
    from lowbit.export import agreement, bit_exact
    from lowbit.export.integer import IntegerModel
    from lowbit.models import get_model
    from lowbit.nn.points import calibrate_points, insert_points

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    data = protocol_data(a.model, a.protocol, calib_size=a.calib, eval_size=a.eval_size,
                         batch_size=64)
    saved = None
    if a.quantized:
        from lowbit.pipeline import load_quantized

        meta = saved_meta(a.quantized, a.model, data)
        saved = load_quantized(get_model(a.model, weights(a.model)).eval(), a.quantized,
                               data.example)
        cfg = saved.lowbit_config
        saved_name = (f"lowbit {meta.get('method')} "
                      f"{(meta.get('method_config') or {}).get('iters', '')} iters (saved)")
        pot_bits = (cfg.weight.bits if cfg.weight else 32, cfg.act.bits if cfg.act else 32)
    model = get_model(a.model, weights(a.model)).eval()
    example = data.example
    evals = list(data.eval)
    subset = []
    for x, y in evals:
        if sum(len(b[1]) for b in subset) >= a.int_size:
            break
        subset.append((x, y))
    tmp = Path(tempfile.mkdtemp(prefix="export_bench_"))
    protocol = "cifar10" if a.model.startswith("resnet") else a.protocol
    rows, runners, float_pred = [], {}, []

    def row(method, fn, bits=(32, 32), path=None, **extra):
        r = {"model": a.model, "method": method, "w_bits": bits[0], "a_bits": bits[1],
             "protocol_name": protocol, "eval_images": sum(len(y) for _, y in evals),
             "calib_images": len(data.calib.dataset), **extra}
        pred = _predict(fn, evals)
        r["top1_ort"] = _top1(pred, evals)
        if float_pred:
            r["drop"], r["drop_se"] = _paired(pred, float_pred[0], evals)
        else:
            float_pred.append(pred)
        if path is not None:
            r["size_kib"] = round(path.stat().st_size / 1024, 1)
        rows.append(r)
        runners[method] = fn
        print({k: r.get(k) for k in FIELDS if k in r}, flush=True)
        return r

    with torch.no_grad():
        row("float torch", lambda x: model(x))
        fpath = tmp / "float.onnx"
        torch.onnx.export(model, example, str(fpath), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        row("float onnxruntime", _ort_run(_session(fpath)), path=fpath)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(data.calib)

            def get_next(self):
                nxt = next(self.it, None)
                return None if nxt is None else {"input": nxt[0].numpy()}

        qpath = tmp / "ort_u8s8.onnx"
        quantize_static(str(fpath), str(qpath), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        anchor = "onnxruntime quantize_static U8S8"
        row(anchor, _ort_run(_session(qpath)), (8, 8), qpath)

    pot_opts = {} if a.iters is None or a.pot_method != "rapq" else {"iters": a.iters}
    pot_name = f"lowbit {a.pot_method}" + (f" {a.iters} iters" if pot_opts else "")
    settings = [("lowbit mse", "mse", lowbit.QuantConfig.uniform(8, 8, observer="mse"), {},
                 (8, 8)),
                ("lowbit mse", "mse", lowbit.QuantConfig.uniform(4, 8, observer="mse"), {},
                 (4, 8)),
                (pot_name, a.pot_method, lowbit.QuantConfig.uniform(4, 8, kind="pot"),
                 pot_opts, (4, 8))]
    if saved is not None:
        settings[-1] = (saved_name, None, None, {}, pot_bits)
    for name, method, config, opts, bits in settings:
        t0 = time.perf_counter()
        q = (saved if method is None
             else lowbit.ptq(model, method, data.calib, config, example, progress=False, **opts))
        seconds = None if method is None else round(time.perf_counter() - t0, 1)
        q, points = insert_points(q)
        calibrate_points(q, points, data.calib)
        top_sim = _top1(_predict(lambda x, q=q: q(x), evals), evals)
        int_pred = _predict(IntegerModel(q).run, subset)
        sim = bit_exact(q)
        exact_pred = _predict(sim, subset)
        one = agreement(q, subset[0][0][:16])["all"]["one_frac"]
        variants = [(f"{name} W{bits[0]}A{bits[1]}", False)]
        if bits[0] == 8:
            variants.append((f"{name} W{bits[0]}A{bits[1]} int8 weights", True))
        for label, int8 in variants:
            path = tmp / f"{label.replace(' ', '_')}.onnx"
            report = lowbit.export(q, example, "onnx", path, int8_weights=int8)
            packed = tmp / f"{path.stem}_packed"
            lowbit.export(q, example, "packed", packed)
            fn = _ort_run(_session(path))
            ort_sub = _predict(fn, subset)
            row(label, fn, bits, path, top1_sim=top_sim,
                top1_int_subset=_top1(int_pred, subset),
                top1_bitexact_subset=_top1(exact_pred, subset),
                top1_ort_subset=_top1(ort_sub, subset),
                int_vs_ort_argmax=round(float((ort_sub == int_pred).double().mean()), 4),
                one_code_frac=round(one, 5), int_images=sum(len(y) for _, y in subset),
                integer_layers=len(report.integer), dequantized=len(report.dequantized),
                ptq_seconds=seconds,
                packed_kib=round((packed / "weights.safetensors").stat().st_size / 1024, 1))
    import os

    with torch.no_grad():
        for b in (1, 32):
            x = torch.cat([example] * (b // len(example) + 1))[:b].contiguous()
            times = _round_robin(runners, x, a.reps * (3 if b == 1 else 1))
            for r in rows:
                t = times[r["method"]]
                r[f"ms_b{b}"] = round(1e3 * statistics.median(t), 3)
                r[f"ms_b{b}_vs_ort"] = round(statistics.median(
                    ti / ta for ti, ta in zip(t, times[anchor], strict=True)), 3)
    load = round(os.getloadavg()[0], 2)
    for r in rows:
        r["load_avg"] = load
        print({k: r.get(k) for k in ("method", "w_bits", "ms_b1", "ms_b32", "ms_b1_vs_ort",
                                     "ms_b32_vs_ort")}, flush=True)
    command = " ".join(["python", "benchmarks/export_bench.py", *sys.argv[1:]])
    save_rows(Path(a.out), [{**r, **provenance(), "command": command} for r in rows],
              FIELDS + ["command"])


if __name__ == "__main__":
    main()
