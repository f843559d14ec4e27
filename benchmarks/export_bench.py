"""Deployment benchmark: latency, top-1 and file size of exported models on onnxruntime.

Rows per model: float torch (eager), float onnxruntime, onnxruntime's own ``quantize_static``
(QDQ, U8S8, per channel: what a user would otherwise pick), and lowbit's W8A8, W4A8 and RAPQ
power-of-two W4A8 exports with the integer model's quantization points (lowbit.nn.points)
calibrated after PTQ (``packed_kib``: the same weights packed at their bit-width). Latency: median of ``--reps`` runs at batch 1 and 32, 2 threads,
OMP_WAIT_POLICY=PASSIVE. Top-1 of lowbit's exports is measured three ways: onnxruntime, the
fake-quant simulation (with points) and, on a subset, the integer reference.

    python benchmarks/export_bench.py --model resnet20                 # full
    python benchmarks/export_bench.py --model resnet20 --quick         # a short check
Results: benchmarks/results/export_bench.{csv,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, protocol_data, provenance, save_rows, weights  # noqa: E402

FIELDS = ["model", "variant", "top1_ort", "top1_sim", "top1_int", "top1_ort_int_subset", "ms_b1",
          "ms_b32", "size_kib", "packed_kib",
          "integer_layers", "dequantized", "eval_images", "calib_images"]
THREADS = 2


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _latency(fn, x, reps: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _ort_run(sess):
    return lambda x: sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _top1(fn, loader) -> float:
    import torch

    right = total = 0
    for x, y in loader:
        out = torch.as_tensor(fn(x))
        right += int((out.argmax(1) == y).sum())
        total += len(y)
    return 100.0 * right / total


def _batches(x):
    import torch

    return {1: x[:1].contiguous(), 32: torch.cat([x] * (32 // len(x) + 1))[:32].contiguous()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--int-size", type=int, default=256, help="images for the integer reference")
    ap.add_argument("--iters", type=int, default=1000, help="rapq reconstruction steps")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true",
                    help="200 images, 128 calibration, 30 rapq steps, 10 reps")
    ap.add_argument("--out", default=str(RESULTS / "export_bench"))
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
    from lowbit.export.integer import IntegerModel
    from lowbit.models import get_model
    from lowbit.nn.points import calibrate_points, insert_points

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    data = protocol_data(a.model, "diverse", calib_size=a.calib, eval_size=a.eval_size,
                         batch_size=64)
    model = get_model(a.model, weights(a.model)).eval()
    example = data.example
    shapes = _batches(example)
    tmp = Path(tempfile.mkdtemp(prefix="export_bench_"))
    rows = []

    def row(variant, fn, path=None, **extra):
        r = {"model": a.model, "variant": variant, "eval_images": len(data.eval.dataset),
             "calib_images": len(data.calib.dataset), **extra}
        r["top1_ort"] = round(_top1(fn, data.eval), 2)
        for b, x in shapes.items():
            r[f"ms_b{b}"] = round(_latency(fn, x, a.reps), 3)
        if path is not None:
            r["size_kib"] = round(path.stat().st_size / 1024, 1)
        rows.append(r)
        print({k: r.get(k) for k in FIELDS if k in r}, flush=True)

    with torch.no_grad():
        row("float torch", lambda x: model(x))
        fpath = tmp / "float.onnx"
        torch.onnx.export(model, example, str(fpath), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        row("float onnxruntime", _ort_run(_session(fpath)), fpath)

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
        row("onnxruntime quantize_static U8S8", _ort_run(_session(qpath)), qpath)

    settings = [("lowbit W8A8 mse", "mse", lowbit.QuantConfig.uniform(8, 8, observer="mse"), {}),
                ("lowbit W4A8 mse", "mse", lowbit.QuantConfig.uniform(4, 8, observer="mse"), {}),
                ("lowbit W4A8 rapq (power of two)", "rapq",
                 lowbit.QuantConfig.uniform(4, 8, kind="pot"), {"iters": a.iters})]
    for name, method, config, opts in settings:
        q = lowbit.ptq(model, method, data.calib, config, example, progress=False, **opts)
        q, points = insert_points(q)
        calibrate_points(q, points, data.calib)
        path = tmp / f"{name.split()[1]}_{method}.onnx"
        report = lowbit.export(q, example, "onnx", path)
        packed = tmp / f"{path.stem}_packed"
        lowbit.export(q, example, "packed", packed)
        top_sim = _top1(lambda x, q=q: q(x), data.eval)
        im = IntegerModel(q)
        sub = [b for i, b in enumerate(data.eval) if i * 64 < a.int_size]
        sess = _session(path)
        row(name, _ort_run(sess), path, top1_sim=round(top_sim, 2),
            top1_int=round(_top1(im.run, sub), 2),
            top1_ort_int_subset=round(_top1(_ort_run(sess), sub), 2),
            integer_layers=len(report.integer), dequantized=len(report.dequantized),
            packed_kib=round((packed / "weights.safetensors").stat().st_size / 1024, 1))
    save_rows(Path(a.out), [{**r, **provenance()} for r in rows], FIELDS)


if __name__ == "__main__":
    main()
