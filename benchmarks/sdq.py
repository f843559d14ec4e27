"""SDQ on CIFAR-10 ResNet-20 from the shared pretrained weights, against uniform LSQ and QIL.

For each weight-bit level b and activation setting, the budget is the cost of the uniform
b-bit config (first/last layer at 8 bits), so SDQ and the uniform baselines are compared at
equal (SDQ: at most equal) cost. Arms:

* ``sdq``: SDQ search, then LSQ retraining of the found config with EBR + distillation;
* ``sdq_no_ebr`` / ``sdq_no_kd``: the same found config retrained without EBR / without KD;
* ``lsq`` / ``qil``: uniform b-bit QAT with the shared trainer, same epochs.

Every arm uses the shared QAT trainer (:mod:`lowbit.qat`) with the same epochs and schedule.
Results: benchmarks/results/sdq_<tag>.{csv,json} and, with matplotlib, sdq_<tag>.png
(accuracy vs BitOPs).

    python benchmarks/sdq.py --quick                     # sanity run (minutes, not a result)
    python benchmarks/sdq.py --bits 2 3 --a-bits 4 float --epochs 30 --search-steps 3000 \\
        --teacher resnet56 --tag full
    python benchmarks/sdq.py ... --budget-kind bitops --tag full_bitops   # equal BitOPs

At equal average weight bits SDQ tends to spend bits on the early layers (many MACs per
weight), so its BitOPs exceed the uniform config's; ``--budget-kind bitops`` compares at equal
BitOPs instead.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, data_root, weights  # noqa: E402

FIELDS = ["arm", "bits", "a_bits", "budget_kind", "budget", "top1", "avg_weight_bits", "gbitops",
          "size_kib", "search_steps", "min_bits", "forced", "epochs", "steps_per_epoch", "teacher",
          "float_top1", "bn", "train_images", "eval_images", "seconds"]
ARMS = ["sdq", "sdq_no_ebr", "sdq_no_kd", "lsq", "qil"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3], help="uniform levels (2 3)")
    p.add_argument("--a-bits", nargs="+", default=["4", "float"], help="activation settings")
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument("--budget-kind", default="avg_weight_bits",
                   choices=["avg_weight_bits", "bitops", "weight_memory"])
    p.add_argument("--search-steps", type=int, default=3000)
    p.add_argument("--dbp-lr", type=float, default=0.02, help="SDQ DBP learning rate")
    p.add_argument("--min-bits", type=int, default=2,
                   help="lowest weight bits of a searched layer (1 allows binary layers)")
    p.add_argument("--check-every", type=int, default=20, help="SDQ step-down period")
    p.add_argument("--epochs", type=int, default=30, help="retraining epochs of every arm")
    p.add_argument("--max-steps", type=int, default=None, help="cut each epoch at N steps")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="SGD lr of the retraining (1e-3; 1e-2 diverged within 10 steps on the "
                   "BN-folded ResNet-20)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the global gradient norm (1.0; KD at T=4 diverged without it)")
    p.add_argument("--teacher", default="resnet20", choices=["resnet20", "resnet56"],
                   help="float teacher for distillation (default: the float ResNet-20 itself)")
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--ebr", type=float, default=1e-2, help="EBR weight")
    p.add_argument("--train-size", type=int, default=None, help="subset of the training set")
    p.add_argument("--eval-size", type=int, default=None, help="subset of the test set")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--quick", action="store_true",
                   help="sanity: 3-bit budget, A4, SDQ and LSQ arms, 200 search steps (DBP lr 0.1), "
                   "30 retraining steps on 2,048 images, evaluation on 1,000")
    p.add_argument("--augment", default="crop-flip", choices=["none", "flip", "crop-flip"],
                   help="batch augmentation of every retraining arm (default crop-flip)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--bn", default="fold", choices=["fold", "train"],
                   help="BatchNorm in retraining: fold (default) or train; at 2 bits and below "
                   "folded BN recovers far more slowly from the quantized start")
    p.add_argument("--reuse-search", nargs="?", const=True, default=False, metavar="TAG",
                   help="retrain the config an earlier run saved instead of searching: this "
                   "run's tag, or the TAG given")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="checkpoint each arm's retraining under DIR/<arm>_w<b>a<a> after every "
                   "epoch and continue from there when run again (long schedules)")
    p.add_argument("--tag", default=None, help="results file suffix (default: full or quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.bits, args.a_bits, args.arms = [3], ["4"], ["sdq", "lsq"]
        args.search_steps, args.epochs, args.max_steps = 200, 1, 30
        args.dbp_lr, args.check_every = 0.1, 10
        args.train_size = args.train_size or 2048
        args.eval_size = args.eval_size or 1000
    args.tag = args.tag or ("quick" if args.quick else "full")
    return args


def _saved_search(folder: Path):
    """The config, steps and forced step-downs of a search saved by an earlier run."""
    import json
    from types import SimpleNamespace

    from lowbit import QuantConfig

    if not (folder / "config.yaml").is_file():
        raise SystemExit(f"--reuse-search: no saved search in {folder}; run without it first")
    info = json.loads((folder / "search.json").read_text())
    seconds = json.loads(p.read_text())["seconds"] if (p := folder / "seconds.json").is_file() else 0.0
    return SimpleNamespace(config=QuantConfig.load(folder / "config.yaml"), steps=info["steps"],
                           forced=info["forced"], seconds=seconds)


def _record_seconds(folder: Path, seconds: float) -> None:
    import json

    (folder / "seconds.json").write_text(json.dumps({"search_seconds": seconds,
                                                     "seconds": seconds}) + "\n")


def _save(args, argv, protocol: str, float_top1: float, rows: list[dict]) -> None:
    """Rewrite the results after every arm, so an interrupted sweep keeps what it finished."""
    from lowbit.report import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"sdq_{args.tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_json(RESULTS / f"sdq_{args.tag}.json", {
        "command": "python benchmarks/sdq.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "protocol": protocol, "float_top1": float_top1, "augment": args.augment, "bn": args.bn, "rows": rows,
    })


def main(argv=None) -> int:
    args = parse(argv)
    root = data_root("cifar10")
    w20 = weights("resnet20")
    teacher_w = weights(args.teacher)

    import torch

    from lowbit import QuantConfig, evaluate, measure, prepare
    from lowbit.data import load_dataset, make_loader, subset
    from lowbit.losses import EntropyBinRegularizer, KnowledgeDistillation, as_hook
    from lowbit.models import get_model, get_spec
    from lowbit.pipeline import build_data
    from lowbit.qat import TrainConfig, qat
    from lowbit.search import Budget, sdq_search
    from lowbit.search.plots import have_matplotlib, plot_pareto

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = get_spec("resnet20")
    data = build_data(spec, "cifar10", root, calib_size=1024, eval_size=args.eval_size,
                      batch_size=256)
    train_set = load_dataset("cifar10", root, "train", mean=spec.mean, std=spec.std)
    if args.train_size:
        train_set = subset(train_set, args.train_size, 0)
    train = make_loader(train_set, args.batch_size, shuffle=True, seed=0)
    model = get_model("resnet20", w20)
    teacher = get_model(args.teacher, teacher_w)
    float_top1 = evaluate(model, data.eval, progress=False).top1
    print(f"float ResNet-20: {float_top1:.2f} % on {data.protocol}")
    example = data.example
    tcfg = TrainConfig(epochs=args.epochs, max_steps_per_epoch=args.max_steps, lr=args.lr,
                       grad_clip=args.grad_clip, augment=args.augment, bn=args.bn, progress=False,
                       logger="none")

    def score(qmodel):
        rep = measure(qmodel, example)
        return dict(top1=evaluate(qmodel, data.eval, progress=False).top1,
                    avg_weight_bits=rep.avg_weight_bits, gbitops=rep.bitops / 1e9,
                    size_kib=rep.size_bytes / 1024)

    def hooks(ebr: bool, kd: bool):
        out = []
        if ebr:
            out.append(as_hook(EntropyBinRegularizer(args.ebr)))
        if kd:
            distill = KnowledgeDistillation(teacher, args.kd_temperature, args.kd_weight)
            distill.check(model, example)
            out.append(as_hook(distill))
        return out

    rows = []
    for a_s in args.a_bits:
        a_bits = None if a_s == "float" else int(a_s)
        for b in args.bits:
            uniform = QuantConfig.uniform(b, a_bits, kind="lsq", observer="mse")
            kind = args.budget_kind
            budget = Budget(kind=kind, value=Budget(kind=kind, value=1).measure(
                measure(prepare(model, uniform, example), example)))
            base = dict(bits=b, a_bits=a_s, budget_kind=kind, budget=budget.value,
                        epochs=args.epochs, steps_per_epoch=args.max_steps or len(train),
                        teacher=args.teacher, float_top1=float_top1, bn=args.bn, train_images=len(train_set),
                        eval_images=len(data.eval.dataset))
            found = None
            if any(a.startswith("sdq") for a in args.arms):
                t = time.perf_counter()
                folder = RESULTS / f"sdq_{args.tag}_configs" / f"w{b}a{a_s}"
                if args.reuse_search:
                    src = args.tag if args.reuse_search is True else args.reuse_search
                    found = _saved_search(RESULTS / f"sdq_{src}_configs" / f"w{b}a{a_s}")
                    search_s = found.seconds
                else:
                    found = sdq_search(model, train, budget, example, a_bits=a_bits,
                                       steps=args.search_steps, dbp_lr=args.dbp_lr,
                                       check_every=args.check_every, min_bits=args.min_bits,
                                       progress=False)
                    search_s = time.perf_counter() - t
                    found.save(folder, plot=None)
                    _record_seconds(folder, search_s)
                    print(found.table())
            for arm in args.arms:
                t = time.perf_counter()
                ckpt = {} if args.checkpoint_dir is None else dict(
                    output_dir=Path(args.checkpoint_dir) / f"{arm}_w{b}a{a_s}", resume=True)
                if arm.startswith("sdq"):
                    res = qat(model, "lsq", train, calib_data=data.calib, example_inputs=example,
                              config=found.config, train=tcfg,
                              hooks=hooks(arm != "sdq_no_ebr", arm != "sdq_no_kd"), **ckpt)
                    extra = dict(search_steps=found.steps, min_bits=args.min_bits,
                                 forced=len(found.forced))
                    seconds = time.perf_counter() - t + search_s
                else:
                    res = qat(model, arm, train, calib_data=data.calib, example_inputs=example,
                              w_bits=b, a_bits=a_bits, train=tcfg, **ckpt)
                    extra, seconds = {}, time.perf_counter() - t
                row = dict(arm=arm, **base, **extra, **score(res.model), seconds=seconds)
                rows.append(row)
                _save(args, argv, data.protocol, float_top1, rows)
                print(f"{arm} W{b} A{a_s}: top-1 {row['top1']:.2f} %, avg bits "
                      f"{row['avg_weight_bits']:.3f}, {row['gbitops']:.4f} GBitOPs")

    if have_matplotlib():
        sdq = [(r["gbitops"], r["top1"], f"SDQ W{r['bits']}A{r['a_bits']}") for r in rows
               if r["arm"] == "sdq"]
        base = [(r["gbitops"], r["top1"], f"{r['arm']} W{r['bits']}A{r['a_bits']}") for r in rows
                if r["arm"] != "sdq"]
        plot_pareto(sdq, [(x, y) for x, y, _ in sdq], RESULTS / f"sdq_{args.tag}.png",
                    "ResNet-20 CIFAR-10", base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
