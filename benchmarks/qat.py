"""QAT benchmarks on ResNet-20 / CIFAR-10: training-step cost and short fine-tuning runs.

(a) ``speed``: time of one training step (forward, loss, backward, SGD step; batch 128,
    channels_last) of the fake-quantized model over the float model. The variants are timed
    in interleaved rounds of a few steps so that load from other processes on a shared
    machine hits them alike; the medians of wall time and of process CPU time per step are
    reported (CPU time is the less load-sensitive of the two).
(b) ``runs``: QIL and LSQ fine-tuning from the pretrained ResNet-20 (91.73 %), each in its own
    process, for a stated number of steps (CPU time is scarce); accuracy on the full test set.

    python benchmarks/qat.py speed --steps 4 --rounds 12
    python benchmarks/qat.py runs --steps 80
    python benchmarks/qat.py runs --only qil_w4a4 lsq_w4a4 --steps 80

Results: benchmarks/results/qat_speed.{csv,json}, benchmarks/results/qat_runs.{csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, data_root, run_child, weights  # noqa: E402

# name -> (method, stages "W/A,...", steps multiplier per stage, extra recipe fields)
RUNS = {
    "qil_w4a4": ("qil", "4/4", 1, {}),
    "qil_w3a3": ("qil", "3/3", 1, {}),
    "qil_w2a2_direct": ("qil", "2/2", 3, {}),
    "qil_w2a2_progressive": ("qil", "4/4,3/3,2/2", 1, {}),
    "qil_w4a4_quantizer_only": ("qil", "4/4", 1, {"freeze_weights": True}),
    "lsq_w4a4": ("lsq", "4/4", 1, {}),
    "lsq_w3a3": ("lsq", "3/3", 1, {}),
    "lsq_w2a2_direct": ("lsq", "2/2", 3, {}),
    "qil_w2a2_direct_bntrain": ("qil", "2/2", 3, {"bn": "train"}),
    "qil_w2a2_progressive_bntrain": ("qil", "4/4,3/3,2/2", 1, {"bn": "train"}),
    # the same 2/2 training as the direct run, started from the 3/3 stage instead of float
    "qil_w2a2_progressive_bntrain_equal2": ("qil", "4/4,3/3,2/2", 1, {"bn": "train",
                                                                      "last_stage_mult": 3}),
    # with the quantizers re-initialised by the observer at each new bitwidth
    "qil_w2a2_progressive_bntrain_recal": ("qil", "4/4,3/3,2/2", 1, {
        "bn": "train", "stage_init": "calibrate"}),
    "qil_w2a2_progressive_bntrain_equal2_recal": ("qil", "4/4,3/3,2/2", 1, {
        "bn": "train", "last_stage_mult": 3, "stage_init": "calibrate"}),
    "qil_w3a3_bntrain": ("qil", "3/3", 1, {"bn": "train"}),
    "qil_w4a4_kd": ("qil", "4/4", 1, {"kd_weight": 1.0, "kd_temperature": 4.0}),
    "qil_w3a3_kd_t4": ("qil", "3/3", 1, {"kd_weight": 1.0, "kd_temperature": 4.0}),
    "qil_w3a3_kd": ("qil", "3/3", 1, {"kd_weight": 1.0, "kd_temperature": 1.0}),
}
# recipe-level fields among the extras (the rest are trainer options)
RECIPE_EXTRAS = {"kd_weight", "kd_temperature", "kd_teacher", "ebr"}
STAGE_EXTRAS = {"last_stage_mult"}


LR, QUANT_LR = 5e-4, 5e-3
# measured by benchmarks/ptq_baseline.py on the same 10,000 test images (not re-evaluated here)
FLOAT_TOP1 = 91.73


def _save(out: Path, rows: list[dict], fields: list[str], meta: dict) -> None:
    from lowbit.report.tables import write_json

    write_json(out.with_suffix(".json"), {**meta, "rows": rows})
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def speed(args) -> None:
    import torch
    import torch.nn.functional as F

    from lowbit import calibrate, prepare
    from lowbit.models import get_model
    from lowbit.qat import method_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    base = get_model("resnet20")
    variants = {"float (BN train)": base}
    for method in ("qil", "lsq"):
        for bn in ("fold", "train"):
            q = prepare(base, method_config(method, 4, 4, bn=bn), x[:8])
            calibrate(q, [x[:32]], progress=False)
            variants[f"{method} W4A4 (BN {bn})"] = q
    steppers = {}
    for name, m in variants.items():
        m = m.to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3,
                              momentum=0.9)

        def step(m=m, opt=opt):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        steppers[name] = step
    wall: dict[str, list[float]] = {n: [] for n in steppers}
    cpu: dict[str, list[float]] = {n: [] for n in steppers}
    for r in range(args.rounds):
        for name, step in steppers.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            wall[name].append((time.perf_counter() - t) / args.steps)
            cpu[name].append((time.process_time() - c) / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {v[-1] * 1000:.0f} ms" for n, v in wall.items()), flush=True)
    ref_w = statistics.median(wall["float (BN train)"])
    ref_c = statistics.median(cpu["float (BN train)"])
    rows = []
    for name in steppers:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        rows.append(dict(variant=name, median_wall_ms=mw * 1000, median_cpu_ms=mc * 1000,
                         min_wall_ms=min(wall[name]) * 1000, ratio_wall=mw / ref_w,
                         ratio_cpu=mc / ref_c,
                         ratio_min_wall=min(wall[name]) / min(wall["float (BN train)"])))
        print(f"{name:<22} median {mw * 1000:7.1f} ms/step wall, {mc * 1000:7.1f} ms CPU; "
              f"ratio to float {mw / ref_w:.2f} (wall) {mc / ref_c:.2f} (CPU)")
    meta = dict(command="python benchmarks/qat.py speed " + " ".join(sys.argv[2:]),
                batch_size=args.batch_size, threads=args.threads, steps=args.steps,
                rounds=args.rounds, warmup=args.warmup, torch=torch.__version__,
                note="interleaved rounds on a shared 2-core machine; random inputs (the cost "
                     "of fake quantization does not depend on pixel values)")
    _save(RESULTS / "qat_speed", rows, list(rows[0]), meta)


def _stages(text: str, epochs: int, last_mult: int):
    """Stages from "W/A,..." where the last stage may train ``last_mult`` times longer."""
    from lowbit.qat.schedule import parse_stages

    stages = parse_stages(text)
    if last_mult != 1:
        stages[-1] = stages[-1].model_copy(update={"epochs": epochs * last_mult})
    return stages


def one(name: str, steps: int | None, threads: int, epochs: int = 1, augment: str = "none",
        log_dir: str | None = None) -> dict:
    import torch

    from lowbit.qat import Recipe, run_recipe

    torch.set_num_threads(threads)
    method, stages, mult, extras = RUNS[name]
    extra = {k: v for k, v in extras.items() if k not in RECIPE_EXTRAS | STAGE_EXTRAS}
    recipe_extra = {k: v for k, v in extras.items() if k in RECIPE_EXTRAS}
    root = data_root("cifar10")
    recipe = Recipe(
        name=name, model="resnet20", weights=weights("resnet20"), dataset="cifar10",
        method=method, stages=_stages(stages, epochs, extras.get("last_stage_mult", 1)),
        per_channel=True, first_last="8bit",
        observer="mse", batch_size=128, calib_size=1024,
        train=dict(epochs=epochs * (1 if steps else mult),
                   max_steps_per_epoch=steps * mult if steps else None, optimizer="sgd", lr=LR,
                   quant_lr=QUANT_LR, weight_decay=1e-4, schedule="cosine",
                   log_every=50, progress=False, augment=augment, **{"bn": "fold", **extra}),
        **recipe_extra,
    )
    t0 = time.perf_counter()
    out = run_recipe(recipe, data_root=root, output_dir=log_dir, resume=log_dir is not None,
                     eval_float=False,
                     echo=lambda s: print(s, flush=True))
    out["float_top1"] = FLOAT_TOP1
    per_stage = {r["bits"]: r["top1"] for r in out["history"]}
    return dict(run=name, method=method, stages=stages,
                steps_per_stage=out["history"][0]["steps"] * recipe.train.epochs,
                epochs_per_stage=recipe.train.epochs, augment=augment,
                total_steps=sum(r["steps"] for r in out["history"]),
                images_seen=128 * sum(r["steps"] for r in out["history"]),
                top1=out["top1"], float_top1=out["float_top1"],
                drop=out["float_top1"] - out["top1"], stage_top1=json.dumps(per_stage),
                train_seconds=out["train_seconds"], wall_seconds=time.perf_counter() - t0,
                quantizer_only=bool(extra.get("freeze_weights")),
                kd_weight=recipe_extra.get("kd_weight"),
                kd_temperature=recipe_extra.get("kd_temperature"), bn=recipe.train.bn,
                stage_init=recipe.train.stage_init)


def runs(args) -> None:
    out = RESULTS / args.out
    prev = json.loads(out.with_suffix(".json").read_text())["rows"] if (
        out.with_suffix(".json").is_file()) else []
    names = args.only or list(RUNS)
    for name in names:
        opts = (["--steps", str(args.steps)] if args.steps else []) + [
            "--epochs", str(args.epochs), "--augment", args.augment]
        cmd = [sys.executable, __file__, "one", name, *opts, "--threads", str(args.threads)]
        if args.log_dir:
            cmd += ["--log-dir", str(Path(args.log_dir) / name)]
        row = run_child(cmd, name)
        if row is None:
            return
        row["command"] = " ".join(["python benchmarks/qat.py runs --only", name, *opts]
                                  + ([] if args.out == "qat_runs" else ["--out", args.out]))
        prev = [r for r in prev if r["run"] != name] + [row]
        fields = list(row)
        _save(out, prev, fields, dict(
            model="resnet20", dataset="cifar10", batch_size=128, threads=args.threads,
            protocol="1024 seeded training images initialise the quantizers (MSE observer); "
                     "top-1 on the full 10,000-image test set (float 91.73 from "
                     "ptq_baseline); SGD momentum 0.9, lr 5e-4 (weights) / 5e-3 (quantizers), "
                     "weight decay 1e-4, cosine over each stage, BN folded, per-channel weights, first/last layer "
                     "8 bits; augmentation as in each row ('crop-flip': pad 4, random crop, "
                     "flip); 2/2 direct gets as many steps as the three progressive stages"))
        print(f"{name:<26} top-1 {row['top1']:.2f} (float {row['float_top1']:.2f}, "
              f"{row['total_steps']} steps, {row['wall_seconds']:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--rounds", type=int, default=12)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("runs")
    r.add_argument("--only", nargs="+", choices=list(RUNS))
    r.add_argument("--steps", type=int, default=None,
                   help="cut each epoch after this many steps (default: full epochs)")
    r.add_argument("--epochs", type=int, default=1, help="epochs per stage")
    r.add_argument("--augment", default="crop-flip", choices=["none", "flip", "crop-flip"])
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--out", default="qat_runs", help="results file stem under benchmarks/results")
    r.add_argument("--log-dir", default=None,
                   help="checkpoint each run under DIR/<run> after every epoch and resume it "
                   "from there when run again (long runs across restarts)")
    o = sub.add_parser("one")
    o.add_argument("name", choices=list(RUNS))
    o.add_argument("--steps", type=int, default=None)
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--augment", default="crop-flip")
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--log-dir", default=None,
                   help="write the trainer's checkpoints and step/epoch logs here, and resume "
                   "from a checkpoint found there")
    args = ap.parse_args()
    if args.what == "speed":
        speed(args)
    elif args.what == "runs":
        runs(args)
    else:
        print("ROW " + json.dumps(one(args.name, args.steps, args.threads, args.epochs, args.augment,
                                     args.log_dir)), flush=True)


if __name__ == "__main__":
    main()
