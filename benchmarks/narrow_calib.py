"""Why narrow calibration breaks block reconstruction: a CIFAR-10 model of the 224 px failure.

Calibrating on images of a few classes and evaluating on all of them reproduces, in minutes,
what 10-class Imagenette calibration does to 1000-class ImageNet models. Each run calibrates
ResNet-20 on ``--calib-size`` seeded training images, either of every class (``diverse``) or of
the classes in ``--classes`` only (``narrow``), and evaluates on the whole CIFAR-10 test set,
paired with the float model on the same images. Results: benchmarks/results/narrow_calib.json.
Variants other than ``nodiversify`` and ``invert-half`` run with the default ``diversify="auto"``
(on for the narrow set); rows named ``default`` measured before that option existed are
``nodiversify``. Rows ``aug-mix`` and ``invert-ce`` are removed experiments
(docs/notes/narrow-calibration.md).

    python benchmarks/narrow_calib.py --calib narrow diverse --methods rapq brecq \\
        --variants default nobn --setting W2A4 --iters 300 --threads 1
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
from common import MODELS, RESULTS, data_root, load_rows, provenance, run_child, save_rows, weights  # noqa: E402

SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W2A4": (2, 4)}
# variant -> options of lowbit.ptq (reconstruction methods); each is one hypothesis
VARIANTS = {
    "default": {},  # rows before the diversify option: what "nodiversify" is now
    "nodiversify": {"diversify": "off"},
    "invert-half": {"diversify": "on"},  # half the images pushed toward random classes
    "nobn": {"bn_guided": False},
    "search": {"iters": 0},
    "rw": {"round_weight": 0.1},
    "nosearch": {"exponent_search": False},
    "bn0.25": {"bn_weight": 0.25},
    "bn1": {"bn_weight": 1.0},
    "early": {},  # reconstruction in conv1 .. layer2 only; layer3 and linear keep the search
    "late": {},  # the reverse
}
LATE = ("layer3", "linear")


def _restrict_units(variant: str) -> None:
    """Reconstruct only the early or only the late units (the others keep the exponent search
    and nearest rounding), to find where narrow calibration does its damage."""
    import dataclasses

    from lowbit.ptq import reconstruct as rec

    inner = rec.reconstruct_unit

    def restricted(unit, q_args, target, opts, *, name="", **kw):
        late = name.startswith(LATE)
        if late == (variant == "early"):
            opts = dataclasses.replace(opts, iters=0)
        return inner(unit, q_args, target, opts, name=name, **kw)

    rec.reconstruct_unit = restricted
FIELDS = ["model", "method", "variant", "calib", "classes", "w_bits", "a_bits", "top1",
          "float_top1", "drop", "drop_se", "agreement", "calib_classes_predicted", "iters",
          "calib_images", "eval_images", "wall_seconds", "threads", "commit"]


def one(method: str, variant: str, calib: str, args) -> dict:
    import torch

    from lowbit import QuantConfig, evaluate, ptq
    from lowbit.data import load_dataset, make_loader, subset
    from lowbit.models import get_model, get_spec

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if variant in {"early", "late"}:
        _restrict_units(variant)
    spec = get_spec("resnet20")
    root = data_root("cifar10")
    kw = dict(mean=spec.mean, std=spec.std)
    train = load_dataset("cifar10", root, "train", **kw)
    test = load_dataset("cifar10", root, "test", **kw)
    if calib == "narrow":
        keep = torch.isin(train.labels, torch.tensor(args.classes)).nonzero().flatten()
        pool = torch.utils.data.Subset(train, keep.tolist())
    else:
        pool = train
    calib_set = subset(pool, args.calib_size, seed=0)
    net = get_model("resnet20", weights("resnet20")).to(memory_format=torch.channels_last)
    w_bits, a_bits = SETTINGS[args.setting]
    opts = dict(VARIANTS[variant])
    if method in {"rapq", "brecq"}:
        opts.setdefault("iters", args.iters)
    config = QuantConfig.uniform(w_bits, a_bits)
    example = next(iter(make_loader(calib_set, 8)))[0]
    q = ptq(net, method, make_loader(calib_set, 64), config, example, progress=False, **opts)
    res = evaluate(q, make_loader(test, 256), reference=net, progress=False)
    cover = getattr(q.lowbit_report, "calib_coverage", None)
    return dict(
        model="resnet20", method=method, variant=variant, calib=calib,
        classes=args.classes if calib == "narrow" else None, w_bits=w_bits, a_bits=a_bits,
        top1=res.top1, float_top1=res.reference_top1, drop=res.reference_top1 - res.top1,
        drop_se=res.delta_se, agreement=res.agreement,
        calib_classes_predicted=cover.predicted if cover else None,
        iters=opts.get("iters"), calib_images=len(calib_set), eval_images=res.samples,
        wall_seconds=time.perf_counter() - t0,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        load_avg_start=os.getloadavg()[0], threads=torch.get_num_threads(),
        command=" ".join(sys.argv), **provenance(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["rapq"],
                    choices=["mse", "pot", "rapq", "brecq"])
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    ap.add_argument("--calib", nargs="+", default=["narrow", "diverse"],
                    choices=["narrow", "diverse"])
    ap.add_argument("--classes", nargs="+", type=int, default=[0],
                    help="CIFAR-10 classes of the narrow calibration set (default: 0, airplane)")
    ap.add_argument("--setting", default="W2A4", choices=list(SETTINGS))
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "narrow_calib"))
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "VARIANT", "CALIB"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    MODELS["resnet20"]  # noqa: B018  (the model this benchmark is about)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print("ROW " + json.dumps(one(*args.child, args)))
        return
    data_root("cifar10")
    weights("resnet20")
    out = Path(args.out)
    rows = load_rows(out)
    for method in args.methods:
        for variant in args.variants if method in {"rapq", "brecq"} else ["default"]:
            for calib in args.calib:
                cmd = [sys.executable, __file__, "--child", method, variant, calib,
                       *sys.argv[1:]]
                row = run_child(cmd, f"{method} {variant} {calib}")
                if row is None:
                    return
                row["command"] = " ".join(["python", "benchmarks/narrow_calib.py", *sys.argv[1:]])
                rows.append(row)
                save_rows(out, rows, FIELDS)
                print(f"{method:6} {variant:8} {calib:8} top1 {row['top1']:.2f} "
                      f"(float {row['float_top1']:.2f}, drop {row['drop']:.2f} "
                      f"± {row['drop_se']:.2f}) agree {row['agreement']:.2f}")


if __name__ == "__main__":
    main()
