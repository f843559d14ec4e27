"""``lowbit demo``: the embedded default run, needing no download.

Trains a tiny CNN on scikit-learn's bundled handwritten digits, then quantizes it with every
method lowbit ships — range-calibrated PTQ, power-of-two PTQ (naive, RAPQ quick and full) and
its float-scale reconstruction twin, LSQ and QIL quantization-aware training, and an SDQ
mixed-precision search retrained with EBR and distillation — and reports accuracy, size and
BitOPs per method. A second part does the same for super-resolution: a tiny EDSR trained in
seconds on scikit-learn's two bundled photos, PSNR per method.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import LayerRule, QuantConfig
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
SR_COLUMNS = ["method", "W/A", "psnr_y", "ssim", "drop", "seconds"]
SR_TRAIN_SHARE = 0.6  # the left 60 % of each photo trains, the right 40 % evaluates


def run_demo(
    output_dir: str | Path = "lowbit-results",
    *,
    epochs: int = 30,
    qat_epochs: int = 8,
    recon_iters: int = 200,
    quick_iters: int = 100,
    sdq_steps: int = 300,
    sr_steps: int = 200,
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
    sr = run_sr_demo(steps=sr_steps, recon_iters=max(1, recon_iters // 5), seed=seed,
                     progress=progress, echo=echo) if sr_steps else None
    payload = {
        "model": "digits_cnn", "dataset": "digits", "protocol": data.protocol,
        "float_epochs": epochs, "qat_epochs": qat_epochs, "reconstruction_iters": recon_iters, "quick_iters": quick_iters,
        "sdq_budget_avg_weight_bits": SDQ_BUDGET, "sdq_bits": found.bits, "seed": seed,
        "first_last_layer": "8 bits", "rows": rows, "super_resolution": sr,
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


def _sr_halves(scale: int):
    """scikit-learn's china/flower photos cut into a training part (left) and an evaluation
    part (right), as whole ``(lr, hr)`` pixel tensors with bicubic LR."""
    from .data.sr import bicubic_down, crop_to_scale, image_tensor, read_rgb, sklearn_photos

    zero, one = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    train, test = [], []
    for path in sklearn_photos():
        img = read_rgb(path)
        w, h = img.size
        cut = int(w * SR_TRAIN_SHARE) // scale * scale
        for part, box in ((train, (0, 0, cut, h)), (test, (cut, 0, w, h))):
            hr = crop_to_scale(img.crop(box), scale)
            part.append((image_tensor(bicubic_down(hr, scale), zero, one),
                         image_tensor(hr, zero, one)))
    return train, test


class _Patches(torch.utils.data.Dataset):
    """``n`` random aligned ``(lr, hr)`` patches of ``side`` LR pixels from whole pairs, drawn
    from torch's generator (``seed``: fixed per item, for calibration)."""

    def __init__(self, pairs, side: int, n: int, seed: int | None = None):
        self.pairs, self.side, self.n, self.seed = pairs, side, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        gen = torch.Generator().manual_seed(self.seed + i) if self.seed is not None else None
        lr, hr = self.pairs[int(torch.randint(len(self.pairs), (1,), generator=gen))]
        s, p = hr.shape[-1] // lr.shape[-1], self.side
        top = int(torch.randint(lr.shape[1] - p + 1, (1,), generator=gen))
        left = int(torch.randint(lr.shape[2] - p + 1, (1,), generator=gen))
        return (lr[:, top:top + p, left:left + p],
                hr[:, top * s:(top + p) * s, left * s:(left + p) * s])


def run_sr_demo(*, steps: int = 200, recon_iters: int = 40, seed: int = 0,
                progress: bool = True, echo=print) -> dict:
    """Train ``edsr_tiny_x2`` (L1, Adam, on the shared trainer) on the left parts of the two
    bundled photos, quantize it, and report PSNR-Y / SSIM on their right parts (BRECQ with
    ``recon_iters`` steps per residual block)."""
    from .qat import TrainConfig
    from .qat.trainer import Trainer
    from .tasks.super_resolution import evaluate_sr, l1_loss

    torch.manual_seed(seed)
    spec = get_spec("edsr_tiny_x2")
    train_pairs, test = _sr_halves(spec.scale)
    side = spec.input_size[1] // 2  # 24 px LR patches: the tiny net learns from many small ones
    train = make_loader(_Patches(train_pairs, side, steps * 16), 16, shuffle=False)
    calib = make_loader(_Patches(train_pairs, side, 64, seed=seed), 32)
    example = next(iter(calib))[0][:2]
    evaluation = [(lr[None], hr[None]) for lr, hr in test]

    t0 = time.perf_counter()
    model = get_model("edsr_tiny_x2")
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=4e-3, weight_decay=0.0, quant_lr=None,
                      schedule="cosine", channels_last=False, logger="none", progress=False,
                      seed=seed)
    Trainer(model, train, cfg, criterion=l1_loss, float_ok=True).fit()
    model.eval()
    base = evaluate_sr(model, evaluation, progress=False, desc="sr float")
    rows = [dict(method="bicubic", **{"W/A": "-"}, psnr_y=base.bicubic_psnr_y,
                 ssim=base.bicubic_ssim, drop=base.bicubic_psnr_y - base.psnr_y, seconds=0.0),
            dict(method="float", **{"W/A": "32/32"}, psnr_y=base.psnr_y, ssim=base.ssim,
                 drop=0.0, seconds=time.perf_counter() - t0)]
    body_only = [LayerRule(match=p, keep_float=True) for p in ("head.*", "tail.*", "body.2")]
    runs = [("ptq-mse", "8/8", "mse", QuantConfig.uniform(8, 8), {}),
            ("ptq-mse", "4/4", "mse", QuantConfig.uniform(4, 4), {}),
            ("ptq-mse body only", "4/4", "mse", QuantConfig.uniform(4, 4, layers=body_only), {}),
            ("ptq-brecq", "4/4", "brecq", QuantConfig.uniform(4, 4), {"iters": recon_iters})]
    for label, wa, method, config, opts in runs:
        t = time.perf_counter()
        q = ptq(model, method, calib, config, example, progress=False, **opts)
        res = evaluate_sr(q, evaluation, progress=False, desc=label)
        rows.append(dict(method=label, **{"W/A": wa}, psnr_y=res.psnr_y, ssim=res.ssim,
                         drop=res.psnr_y - base.psnr_y, seconds=time.perf_counter() - t))
    echo(f"super-resolution x{spec.scale}: edsr_tiny_x2 trained {steps} steps on the left "
         f"{SR_TRAIN_SHARE:.0%} of scikit-learn's china/flower photos, evaluated on the rest")
    echo(format_table([{**r, "psnr_y": f"{r['psnr_y']:.3f}", "ssim": f"{r['ssim']:.4f}",
                        "drop": f"{r['drop']:+.3f}"} for r in rows], SR_COLUMNS))
    return {"model": "edsr_tiny_x2", "train_steps": steps, "patch_lr": side,
            "train_share": SR_TRAIN_SHARE, "metric": "PSNR-Y (dB, border crop of the scale)",
            "rows": rows}
