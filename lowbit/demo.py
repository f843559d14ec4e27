"""``lowbit demo``: the embedded default run, needing no download.

Trains a tiny CNN on scikit-learn's bundled handwritten digits, then quantizes it with every
method lowbit ships — range-calibrated PTQ, power-of-two PTQ (naive, RAPQ quick and full) and
its float-scale reconstruction twin, LSQ and QIL quantization-aware training, and an SDQ
mixed-precision search retrained with EBR and distillation — and reports accuracy, size and
BitOPs per method.
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
from .ptq import ptq
from .report import format_table, write_json
from .train import train_epochs

PTQ_SETTINGS = [(8, 8), (4, 8), (4, 4), (2, 4)]
RANGE_METHODS = ["minmax", "percentile", "mse"]
POT_SETTINGS = [(4, 4), (2, 4)]
POT_METHODS = ["pot", "rapq-quick", "rapq", "brecq"]
QAT_SETTINGS = [(4, 4), (2, 4)]
QAT_METHODS = ["lsq", "qil"]
SDQ_BUDGET = 3.0
COLUMNS = ["method", "W/A", "top1", "agree", "size_KiB", "MBitOPs", "seconds"]


def run_demo(
    output_dir: str | Path = "lowbit-results",
    *,
    epochs: int = 30,
    qat_epochs: int = 8,
    recon_iters: int = 200,
    quick_iters: int = 100,
    sdq_steps: int = 300,
    seed: int = 0,
    progress: bool = True,
    echo=print,
) -> dict:
    """Train, quantize with each method, print the table, write ``demo.json``; return results."""
    from .losses import EntropyBinRegularizer, KnowledgeDistillation, as_hook
    from .qat import TrainConfig, qat
    from .search import sdq_search

    torch.manual_seed(seed)
    spec = get_spec("digits_cnn")
    data = build_data(spec, calib_size=512, batch_size=64, seed=seed)
    train_set = load_dataset("digits", split="train", mean=spec.mean, std=spec.std)
    train_loader = make_loader(train_set, 64, shuffle=True, seed=seed)
    example = data.example

    t0 = time.perf_counter()
    model = get_model("digits_cnn")
    train_epochs(model, train_loader, epochs, lr=1e-2, progress=progress, seed=seed)
    rows = [_row("float", "32/32", model, None, data, example, t0)]
    echo(f"float digits_cnn: top-1 {rows[0]['top1']:.2f} %  ({data.protocol})")

    def add(method: str, wa: str, start: float, qmodel) -> None:
        rows.append(_row(method, wa, qmodel, model, data, example, start))
        if progress:
            echo(f"  {method:<16} {wa:<8} top-1 {rows[-1]['top1']:.2f} %")

    for w, a in PTQ_SETTINGS:
        for method in RANGE_METHODS:
            t = time.perf_counter()
            add(f"ptq-{method}", f"{w}/{a}", t, ptq(model, method, data.calib,
                QuantConfig.uniform(w, a), example, progress=False))
    for w, a in POT_SETTINGS:
        for method in POT_METHODS:
            opts = {"pot": {}, "rapq-quick": {"quick_iters": quick_iters},
                    "rapq": {"iters": recon_iters},
                    "brecq": {"iters": recon_iters}}[method]
            t = time.perf_counter()
            add(f"ptq-{method}", f"{w}/{a}", t, ptq(model, method, data.calib,
                QuantConfig.uniform(w, a), example, progress=False, **opts))
    train_cfg = TrainConfig(epochs=qat_epochs, optimizer="adam", lr=1e-3, quant_lr=1e-3,
                            weight_decay=0.0, logger="none", progress=False, seed=seed)
    for w, a in QAT_SETTINGS:
        for method in QAT_METHODS:
            t = time.perf_counter()
            res = qat(model, method, train_loader, calib_data=data.calib, example_inputs=example,
                      w_bits=w, a_bits=a, train=train_cfg)
            add(f"qat-{method}", f"{w}/{a}", t, res.model)
    t = time.perf_counter()
    found = sdq_search(model, train_loader, SDQ_BUDGET, example, steps=sdq_steps, a_bits=4,
                       seed=seed, progress=False)
    hooks = [as_hook(EntropyBinRegularizer(1e-2)), as_hook(KnowledgeDistillation(model, 4.0, 1.0))]
    res = qat(model, "lsq", train_loader, calib_data=data.calib, example_inputs=example,
              config=found.config, train=train_cfg, hooks=hooks)
    add("sdq+ebr+kd", f"{found.achieved:.2f}/4", t, res.model)

    echo(format_table(rows, COLUMNS))
    payload = {
        "model": "digits_cnn", "dataset": "digits", "protocol": data.protocol,
        "float_epochs": epochs, "qat_epochs": qat_epochs, "reconstruction_iters": recon_iters, "quick_iters": quick_iters,
        "sdq_budget_avg_weight_bits": SDQ_BUDGET, "sdq_bits": found.bits, "seed": seed,
        "first_last_layer": "8 bits", "rows": rows,
    }
    path = write_json(Path(output_dir) / "demo.json", payload)
    echo(f"results written to {path}")
    return payload


def _row(method, wa, q, reference, data, example, t0) -> dict:
    res = evaluate(q, data.eval, reference=reference, progress=False)
    cost = measure(q, example)
    return dict(method=method, **{"W/A": wa}, top1=res.top1,
                agree=100.0 if reference is None else res.agreement,
                size_KiB=cost.size_bytes / 1024, MBitOPs=cost.bitops / 1e6,
                seconds=time.perf_counter() - t0)
