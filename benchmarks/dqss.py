"""DQSS-PTQ against every single strategy of its candidate set, paired on the same test images.

ResNet-20 or ResNet-56 (``--model``) on CIFAR-10: every run calibrates on the same seeded training
images and gets the same budget per reconstruction unit: ``--iters`` search steps plus
``--finetune-iters`` steps of the chosen quantizers, on the same batches (``--compare-iters`` of
each option's fine-tune before the choice are DQSS's overhead). A single strategy is the same
pipeline with a one-candidate set, so the only difference is the choice. Each model's per-image
correctness on the test set gives the top-1 and, paired image by image, the margin of DQSS over
each single strategy with its standard error (``margin``: a search's over the best single
strategy, a single strategy's: the default search's over it; ``margins``: a search's over each).
``--variants`` adds DQSS without the temperature annealing and/or the warm-up (the ablation).
``--hits DIR`` saves every run's per-image hits and row; ``--reuse`` then pairs a later run
against saved runs (single strategies, or a search: ``--variants --singles --reuse dqss qil ...``
only re-pairs) instead of re-running them (the runs are deterministic for the seed and budget,
which the saved row must match: model, bits, budget, data and ``--extra``). Results:
benchmarks/results/dqss.json (and .csv).

    python benchmarks/dqss.py --setting W4A4 --candidates mse lsq qil pact --iters 200 \\
        --finetune-iters 100 --threads 1
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, data_root, load_rows, provenance, save_rows, weights  # noqa: E402

MODELS = ["resnet20", "resnet56"]
SETTINGS = {"W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4)}
# DQSS variants (the ablation of the anti-under-fitting adjustment); single strategies have no
# logits, so these settings do not change them
VARIANTS = {"default": {}, "noanneal": {"final_temperature": 1.0}, "nowarmup": {"warmup": 0.0},
            "neither": {"warmup": 0.0, "final_temperature": 1.0}}
FIELDS = ["model", "run", "tag", "w_bits", "a_bits", "top1", "drop", "drop_se", "margin",
          "margin_se", "margin_against",
          "choices", "iters", "finetune_iters", "calib_images", "eval_images", "seconds",
          "cpu_seconds", "threads", "commit"]


def correct(model, loader):
    """Per-image top-1 hits (bool tensor), in loader order."""
    import torch

    model.eval()
    hits = []
    with torch.no_grad():
        for x, y in loader:
            hits.append(model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y)
    return torch.cat(hits)


def paired(a, b) -> tuple[float, float]:
    """Mean of ``a - b`` in points and its standard error (same images)."""
    d = a.double() - b.double()
    return 100.0 * float(d.mean()), 100.0 * float(d.std(unbiased=True)) / math.sqrt(d.numel())


def pairing(hits: dict) -> dict:
    """Each run's margin fields from every run's per-image hits (``name -> hits``; a search's
    name starts with ``dqss``): a search is paired against the best single strategy (``margin``)
    and against each (``margins``), a single strategy against the first search."""
    searched = [n for n in hits if n.startswith("dqss")]
    best = max((n for n in hits if n not in searched), default=None,
               key=lambda n: float(hits[n].double().mean()))
    lead = searched[0] if searched else None
    out = {}
    for name, h in hits.items():
        if name in searched:
            margin, margin_se = paired(h, hits[best]) if best else (None, None)
            out[name] = dict(margin=margin, margin_se=margin_se, margin_against=best,
                             margins={n: paired(h, hits[n]) for n in hits if n not in searched})
        else:
            margin, margin_se = paired(hits[lead], h) if lead else (None, None)
            out[name] = dict(margin=margin, margin_se=margin_se, margin_against=lead,
                             margins=None)
    return out


def hits_path(folder: Path, model: str, setting: str, run: str) -> Path:
    return folder / model / setting / f"{run}.safetensors"


def save_hits(folder: Path, setting: str, row: dict, hits) -> None:
    """One run's per-image hits, with its row as metadata (what --reuse pairs against)."""
    import json

    import torch
    from safetensors.torch import save_file

    path = hits_path(folder, row["model"], setting, row["run"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"hits": hits.to(torch.uint8)}, str(path), metadata={"row": json.dumps(row)})


def load_hits(folder: Path, setting: str, run: str, budget: dict):
    """A saved run's row and hits; refused unless it ran with this setting and ``budget`` (a dict
    of row fields, ``model`` among them)."""
    import json

    import torch
    from safetensors import safe_open

    path = hits_path(folder, budget["model"], setting, run)
    if not path.is_file():
        raise SystemExit(f"--reuse {run}: no saved run at {path}; run it once with --hits")
    with safe_open(str(path), "pt") as f:
        row = json.loads(f.metadata()["row"])
        hits = f.get_tensor("hits").to(torch.bool)
    differ = {k: (row.get(k), v) for k, v in budget.items() if row.get(k) != v}
    if differ:
        raise SystemExit(f"--reuse {run}: {path} ran with other settings (saved, now): {differ}")
    return row, hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", choices=MODELS)
    ap.add_argument("--setting", default="W4A4", choices=list(SETTINGS))
    ap.add_argument("--candidates", nargs="+", default=["mse", "lsq", "qil", "pact"],
                    help="strategies for weights and activations alike")
    ap.add_argument("--variants", nargs="*", default=["default"], choices=list(VARIANTS))
    ap.add_argument("--singles", nargs="*", default=None,
                    help="single strategies to run (default: every candidate)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--finetune-iters", type=int, default=100)
    ap.add_argument("--compare-iters", type=int, default=25,
                    help="DQSS: fine-tune steps of each option before the unit's choice")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--eval-size", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="label of this set of rows (e.g. an ablation)")
    ap.add_argument("--extra", default="{}", help="JSON of further DQSS settings")
    ap.add_argument("--out", default=str(RESULTS / "dqss"))
    ap.add_argument("--hits", default=None,
                    help="folder for every run's per-image hits and row (read by --reuse)")
    ap.add_argument("--reuse", nargs="*", default=[],
                    help="runs (single strategies or a search, e.g. dqss) read from --hits "
                         "instead of re-run; every run present is paired again")
    args = ap.parse_args()
    if args.reuse and not args.hits:
        ap.error("--reuse reads saved runs: give the folder with --hits DIR")
    root = data_root("cifar10")
    path = weights(args.model)

    import json

    import torch

    from lowbit.data import load_dataset, make_loader, subset
    from lowbit.models import get_model, get_spec
    from lowbit.search import dqss_search

    torch.set_num_threads(args.threads)
    spec = get_spec(args.model)
    kw = dict(mean=spec.mean, std=spec.std)
    calib = subset(load_dataset("cifar10", root, "train", **kw), args.calib_size, seed=0)
    test = load_dataset("cifar10", root, "test", **kw)
    if args.eval_size is not None and args.eval_size < len(test):
        test = subset(test, args.eval_size, seed=0)
    batches = list(make_loader(calib, 64))
    test_loader = make_loader(test, 250)
    net = get_model(args.model, path).eval()
    w_bits, a_bits = SETTINGS[args.setting]
    extra = json.loads(args.extra)
    common = dict(mode="ptq", w_bits=w_bits, a_bits=a_bits, iters=args.iters,
                  finetune_iters=args.finetune_iters, compare_iters=args.compare_iters,
                  progress=False, **extra)
    float_hits = correct(net, test_loader)
    singles = args.candidates if args.singles is None else args.singles
    budget = dict(model=args.model, extra=extra, w_bits=w_bits, a_bits=a_bits,
                  iters=args.iters, finetune_iters=args.finetune_iters, calib_images=len(calib),
                  eval_images=len(test))
    saved = {n: load_hits(Path(args.hits), args.setting, n, budget) for n in args.reuse}
    for n, (row, _) in saved.items():
        if n.startswith("dqss") and row["settings"]["w_candidates"] != args.candidates:
            raise SystemExit(f"--reuse {n}: it searched {row['settings']['w_candidates']}, "
                             f"not --candidates {args.candidates}")
    plan = [("dqss" if v == "default" else f"dqss-{v}", args.candidates, VARIANTS[v])
            for v in args.variants] + [(c, [c], {}) for c in singles]
    runs = {}
    for name, cands, variant in plan:
        t0, c0 = time.perf_counter(), time.process_time()
        r = dqss_search(net, batches, None, batches[0][0][:2], w_candidates=cands,
                        a_candidates=cands, **{**common, **variant})
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs[name] = (r, correct(r.model, test_loader), seconds, cpu)
        print(f"{name}: {100 * float(runs[name][1].double().mean()):.2f} % in {seconds:.0f} s",
              flush=True)
    runs.update({n: (None, hits, None, None) for n, (_, hits) in saved.items()})
    searched = [n for n in runs if n.startswith("dqss")]
    margins = pairing({n: run[1] for n, run in runs.items()})
    rows = [r for r in load_rows(Path(args.out))
            if not (r.get("tag", "") == args.tag and r["w_bits"] == w_bits
                    and r["a_bits"] == a_bits and r.get("model", "resnet20") == args.model)]
    for name, (r, hits, seconds, cpu) in runs.items():
        drop, drop_se = paired(float_hits, hits)
        if name in saved:  # its own row as saved, paired against the runs of this call
            rows.append(dict(saved[name][0], tag=args.tag, **margins[name], hits_reused=True))
            continue
        rows.append(dict(
            model=args.model, run=name, tag=args.tag, w_bits=w_bits, a_bits=a_bits,
            top1=100.0 * float(hits.double().mean()),
            float_top1=100.0 * float(float_hits.double().mean()), drop=drop, drop_se=drop_se,
            **margins[name],
            choices=r.counts() if name in searched else None,
            per_layer=r.choices if name in searched else None,
            units=r.history, iters=args.iters, finetune_iters=args.finetune_iters,
            calib_images=len(calib), eval_images=int(hits.numel()), extra=extra, seconds=seconds,
            cpu_seconds=cpu,
            settings=r.settings.model_dump(mode="json"),
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            load_avg_start=os.getloadavg()[0], threads=torch.get_num_threads(),
            command="python " + shlex.join(sys.argv), **provenance()))
    save_rows(Path(args.out), rows, FIELDS)
    if args.hits:
        for row in rows[-len(runs):]:
            if not row.get("hits_reused"):
                save_hits(Path(args.hits), args.setting, row, runs[row["run"]][1])
    for row in rows[-len(runs):]:
        m = "" if row["margin"] is None else (
            f"  margin {row['margin']:+.2f} +- {row['margin_se']:.2f} ({row['margin_against']})")
        print(f"{row['run']:>6}: top-1 {row['top1']:.2f} (drop {row['drop']:.2f} +- "
              f"{row['drop_se']:.2f}){m}  {row['seconds']:.0f} s")


if __name__ == "__main__":
    main()
