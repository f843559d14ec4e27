"""Label-free QAT on ResNet-20 / CIFAR-10 (QIL's "without the original training data", §4.2).

QIL 4/4 from the pretrained ResNet-20, the same steps, batch, schedule and seed for every run,
trained on
(a) ``labels``: CIFAR-10 train with its labels (cross-entropy),
(b) ``cifar_kd``: CIFAR-10 train without labels (``--loss kd``: distillation from the float
    model only),
(c) ``imagenette_kd``: the ImageNet-subset photos of ``../shared/data/imagenette`` (other
    classes, other statistics), resized to 32 px, without labels;
each calibrated on 1024 seeded images of its own training images, and evaluated on all
10,000 CIFAR-10 test images. Each difference against (a) is paired (the same test images)
with its standard error.

    python benchmarks/label_free.py --epochs 5 --steps 60 --batch-size 64 --threads 1

Results: benchmarks/results/label_free.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, data_root, provenance, skip, weights  # noqa: E402

RUNS = {"labels": "ce", "cifar_kd": "kd", "imagenette_kd": "kd"}
LR, QUANT_LR = 5e-4, 5e-3


def predictions(model, loader):
    """Top-1 class of every test image, in the loader's (fixed) order."""
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(x).argmax(1) for x, _ in loader])


def paired(hit, ref_hit) -> tuple[float, float]:
    """Difference of accuracies in points and its paired standard error."""
    d = hit.double() - ref_hit.double()
    return 100.0 * float(d.mean()), 100.0 * float(d.std()) / math.sqrt(d.numel())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="steps per epoch")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--bits", type=int, default=4, choices=[2, 3, 4],
                    help="QIL weight and activation bits (results: label_free.json at 4, "
                    "label_free_wBaB.json otherwise)")
    args = ap.parse_args()

    import torch

    from lowbit.data import load_dataset, make_loader
    from lowbit.models import get_model, get_spec
    from lowbit.pipeline import dataset_kwargs
    from lowbit.qat import Recipe, run_recipe
    from lowbit.report.tables import write_json

    torch.set_num_threads(args.threads)
    root, w = data_root("cifar10"), weights("resnet20")
    photos = SHARED / "imagenette"
    if "imagenette_kd" in args.only and not photos.is_dir():
        skip(f"{photos} not found: run (c) needs the imagenette photos")
    spec = get_spec("resnet20")
    test = make_loader(load_dataset("cifar10", root, "test", **dataset_kwargs(spec, "cifar10")),
                       500)
    labels = torch.cat([y for _, y in test])
    float_pred = predictions(get_model("resnet20", w), test)
    rows, hits = [], {}
    for name in args.only:
        recipe = Recipe(
            name=name, model="resnet20", weights=w, dataset="cifar10", method="qil",
            stages=[{"w_bits": args.bits, "a_bits": args.bits}], batch_size=args.batch_size, calib_size=1024,
            eval_size=500,  # the per-epoch check only; the result is on all test images below
            train=dict(epochs=args.epochs, max_steps_per_epoch=args.steps, lr=LR,
                       quant_lr=QUANT_LR, schedule="cosine", augment="crop-flip",
                       loss=RUNS[name], log_every=50, progress=False, seed=0),
        )
        t0 = time.perf_counter()
        out = run_recipe(recipe, data_root=root,
                         train_root=photos if name == "imagenette_kd" else None,
                         eval_float=False, echo=lambda s: print(s, flush=True))
        pred = predictions(out["model"], test)
        hits[name] = pred == labels
        row = dict(run=name, loss=RUNS[name], training_data=out["training_data"],
                   calibration=out["protocol"].split("; evaluation")[0],
                   steps=sum(r["steps"] for r in out["history"]), batch_size=args.batch_size,
                   top1=100.0 * float(hits[name].double().mean()),
                   float_top1=100.0 * float((float_pred == labels).double().mean()),
                   agreement_with_float=100.0 * float((pred == float_pred).double().mean()),
                   train_seconds=out["train_seconds"], wall_seconds=time.perf_counter() - t0)
        if "labels" in hits and name != "labels":
            row["diff_vs_labels"], row["diff_se"] = paired(hits[name], hits["labels"])
        rows.append(row)
        print(f"{name}: top-1 {row['top1']:.2f} % (agreement with float "
              f"{row['agreement_with_float']:.2f} %)"
              + (f", {row['diff_vs_labels']:+.2f} +- {row['diff_se']:.2f} vs labels"
                 if "diff_se" in row else ""), flush=True)
    b = args.bits
    write_json(RESULTS / ("label_free.json" if b == 4 else f"label_free_w{b}a{b}.json"), {
        "command": "python benchmarks/label_free.py " + " ".join(sys.argv[1:]),
        "model": "resnet20", "method": "qil", "bits": f"{b}/{b}",
        "setting": f"{args.epochs} epochs x {args.steps} steps of batch {args.batch_size}; SGD "
                   f"lr {LR} (quantizers {QUANT_LR}), cosine, crop-flip, BN folded, per-channel, "
                   "first/last 8 bit, MSE observer; KD: float ResNet-20 teacher, T=1, weight 1",
        "evaluation": "all 10,000 CIFAR-10 test images; differences paired on them",
        "threads": args.threads, **provenance(), "rows": rows,
    })


if __name__ == "__main__":
    main()
