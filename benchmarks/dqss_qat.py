"""DQSS-QAT against single strategies trained alone, with and without the anti-under-fitting
adjustment, paired on the same test images.

ResNet-20 on CIFAR-10 from the pretrained weights. Every run is the same pipeline
(``dqss_search`` in ``qat`` mode on the shared trainer): calibration on the same batches, then
``--steps`` Adam steps on the same seeded training batches at the same constant learning rates;
a single strategy is a one-candidate set (no logits, so the schedule does not touch it).
``dqss`` uses the default adjustment (warm-up 0.2, temperature 1 -> 0.1), ``dqss-neither``
neither; both then take the argmax and are evaluated as the discrete model, with no further
training. The weight side of ``qil`` is LSQ: QIL's weight intervals collapse under the shared
trainer's Adam at ``quant_lr`` 1e-3 (docs/dqss.md), so QIL is compared where it trains, on the
activations. Results: benchmarks/results/dqss_qat.json (and .csv).

    python benchmarks/dqss_qat.py --setting W3A3 --steps 80 --threads 1
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
from common import RESULTS, data_root, load_rows, provenance, save_rows, weights  # noqa: E402
from dqss import correct, paired  # noqa: E402

SETTINGS = {"W4A4": (4, 4), "W3A3": (3, 3), "W2A2": (2, 2)}
W_CANDIDATES = ["lsq", "pact"]
A_CANDIDATES = ["lsq", "qil", "pact"]
# name: (weight candidates, activation candidates, schedule overrides)
RUNS = {
    "dqss": (W_CANDIDATES, A_CANDIDATES, {}),
    "dqss-neither": (W_CANDIDATES, A_CANDIDATES, {"warmup": 0.0, "final_temperature": 1.0}),
    "lsq": (["lsq"], ["lsq"], {}),
    "qil": (["lsq"], ["qil"], {}),
    "pact": (["pact"], ["pact"], {}),
}
FIELDS = ["model", "run", "w_bits", "a_bits", "top1", "drop", "drop_se", "margin", "margin_se",
          "margin_against", "choices", "steps", "batch_size", "train_images", "eval_images",
          "seconds", "cpu_seconds", "threads", "commit"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="W3A3", choices=list(SETTINGS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extra", default="{}", help="JSON of further DQSS settings")
    ap.add_argument("--out", default=str(RESULTS / "dqss_qat"))
    args = ap.parse_args()
    root = data_root("cifar10")
    path = weights("resnet20")

    import torch

    from lowbit.data import load_dataset, make_loader, subset
    from lowbit.models import get_model, get_spec
    from lowbit.search import dqss_search

    torch.set_num_threads(args.threads)
    spec = get_spec("resnet20")
    kw = dict(mean=spec.mean, std=spec.std)
    n_train = args.steps * args.batch_size
    train = subset(load_dataset("cifar10", root, "train", **kw), n_train, seed=0)
    batches = list(make_loader(train, args.batch_size, shuffle=True, seed=0))
    test = load_dataset("cifar10", root, "test", **kw)
    if args.eval_size is not None and args.eval_size < len(test):
        test = subset(test, args.eval_size, seed=0)
    test_loader = make_loader(test, 250)
    net = get_model("resnet20", path).eval()
    w_bits, a_bits = SETTINGS[args.setting]
    common = dict(mode="qat", w_bits=w_bits, a_bits=a_bits, steps=args.steps,
                  check_every=max(1, args.steps // 4), progress=False, **json.loads(args.extra))
    float_hits = correct(net, test_loader)
    runs = {}
    for name in args.runs:
        wc, ac, variant = RUNS[name]
        t0, c0 = time.perf_counter(), time.process_time()
        r = dqss_search(net, batches, None, batches[0][0][:2], w_candidates=wc,
                        a_candidates=ac, **{**common, **variant})
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs[name] = (r, correct(r.model, test_loader), seconds, cpu)
        print(f"{name}: {100 * float(runs[name][1].double().mean()):.2f} % in {seconds:.0f} s",
              flush=True)
    searched = [n for n in runs if n.startswith("dqss")]
    best = max((n for n in runs if n not in searched), default=None,
               key=lambda n: float(runs[n][1].double().mean()))
    rows = [r for r in load_rows(Path(args.out))
            if not (r["w_bits"] == w_bits and r["a_bits"] == a_bits and r["run"] in runs)]
    for name, (r, hits, seconds, cpu) in runs.items():
        drop, drop_se = paired(float_hits, hits)
        if name in searched:
            margin, margin_se = paired(hits, runs[best][1]) if best else (None, None)
            against = {n: paired(hits, runs[n][1]) for n in runs if n not in searched}
        else:
            lead = searched[0] if searched else None
            margin, margin_se = paired(runs[lead][1], hits) if lead else (None, None)
            against = None
        rows.append(dict(
            model="resnet20", run=name, w_bits=w_bits, a_bits=a_bits,
            top1=100.0 * float(hits.double().mean()),
            float_top1=100.0 * float(float_hits.double().mean()), drop=drop, drop_se=drop_se,
            margin=margin, margin_se=margin_se,
            margin_against=best if name in searched else (searched[0] if searched else None),
            margins=against, choices=r.counts() if name in searched else None,
            per_layer=r.choices if name in searched else None, history=r.history,
            steps=args.steps, batch_size=args.batch_size, train_images=n_train,
            eval_images=int(hits.numel()), seconds=seconds, cpu_seconds=cpu,
            settings=r.settings.model_dump(mode="json"),
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            load_avg_start=os.getloadavg()[0], threads=torch.get_num_threads(),
            command="python " + " ".join(sys.argv), **provenance()))
    save_rows(Path(args.out), rows, FIELDS)
    for row in rows[-len(runs):]:
        m = "" if row["margin"] is None else (
            f"  margin {row['margin']:+.2f} +- {row['margin_se']:.2f} ({row['margin_against']})")
        print(f"{row['run']:>12}: top-1 {row['top1']:.2f} (drop {row['drop']:.2f} +- "
              f"{row['drop_se']:.2f}){m}  {row['seconds']:.0f} s")


if __name__ == "__main__":
    main()
