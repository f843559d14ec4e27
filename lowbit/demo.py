"""``lowbit demo``: the embedded default run, needing no download.

Trains a tiny CNN on scikit-learn's bundled handwritten digits, quantizes it with every
method lowbit ships, and reports accuracy, size and BitOPs per method.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import QuantConfig
from .cost import measure
from .data import load_dataset, make_loader
from .evaluate import evaluate
from .models import get_model, get_spec
from .pipeline import build_data
from .prepare import calibrate, prepare
from .ptq import ptq
from .report import format_table, write_json
from .train import train_epochs

SETTINGS = [(8, 8), (4, 8), (4, 4), (2, 4)]
PTQ_METHODS = ["minmax", "percentile", "mse"]
QAT_SETTINGS = [(4, 4), (2, 4)]
COLUMNS = ["method", "W/A", "top1", "agree", "size_KiB", "MBitOPs", "seconds"]


def run_demo(
    output_dir: str | Path = "lowbit-results",
    *,
    epochs: int = 30,
    qat_epochs: int = 8,
    seed: int = 0,
    progress: bool = True,
    echo=print,
) -> dict:
    """Train, quantize with each method, print the table, write ``demo.json``; return results."""
    torch.manual_seed(seed)
    spec = get_spec("digits_cnn")
    data = build_data(spec, calib_size=512, batch_size=64, seed=seed)
    train_set = load_dataset("digits", split="train", mean=spec.mean, std=spec.std)
    train_loader = make_loader(train_set, 64, shuffle=True, seed=seed)
    example = data.example

    t0 = time.perf_counter()
    model = get_model("digits_cnn")
    train_epochs(model, train_loader, epochs, lr=1e-2, progress=progress, seed=seed)
    float_res = evaluate(model, data.eval, progress=False)
    cost = measure(model, example)
    rows = [dict(method="float", **{"W/A": "32/32"}, top1=float_res.top1, agree=100.0,
                 size_KiB=cost.size_bytes / 1024, MBitOPs=cost.bitops / 1e6,
                 seconds=time.perf_counter() - t0)]
    echo(f"float digits_cnn: {float_res}  ({data.protocol})")

    for w, a in SETTINGS:
        for method in PTQ_METHODS:
            t = time.perf_counter()
            q = ptq(model, method, data.calib, QuantConfig.uniform(w, a), example,
                    progress=False)
            rows.append(_row(f"ptq-{method}", w, a, q, model, data, example, t))
    for w, a in QAT_SETTINGS:
        t = time.perf_counter()
        q = prepare(model, QuantConfig.uniform(w, a, kind="lsq", observer="mse"), example)
        calibrate(q, data.calib, progress=False)
        train_epochs(q, train_loader, qat_epochs, lr=1e-3, progress=progress, seed=seed)
        rows.append(_row("qat-lsq", w, a, q, model, data, example, t))

    echo(format_table(rows, COLUMNS))
    payload = {
        "model": "digits_cnn", "dataset": "digits", "protocol": data.protocol,
        "float_epochs": epochs, "qat_epochs": qat_epochs, "seed": seed,
        "first_last_layer": "8 bits", "rows": rows,
    }
    path = write_json(Path(output_dir) / "demo.json", payload)
    echo(f"results written to {path}")
    return payload


def _row(method, w, a, q, reference, data, example, t0) -> dict:
    res = evaluate(q, data.eval, reference=reference, progress=False)
    cost = measure(q, example)
    return dict(method=method, **{"W/A": f"{w}/{a}"}, top1=res.top1, agree=res.agreement,
                size_KiB=cost.size_bytes / 1024, MBitOPs=cost.bitops / 1e6,
                seconds=time.perf_counter() - t0)
