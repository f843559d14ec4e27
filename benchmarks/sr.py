"""Super-resolution benchmark: bicubic, float and quantized rows of an EDSR model at one scale,
through the command line (each row is one or more CLI runs, their results files kept).

Run kinds: ``ptq`` (one ``lowbit ptq``), ``qat`` (``lowbit qat`` with an L1 loss, then
``lowbit eval --quantized`` of the trained model against the float one) and ``sdq``
(``lowbit search`` to an average-weight-bits budget, the found config retrained by ``lowbit
qat``, then evaluated). Evaluation images: ``sr-sklearn`` (scikit-learn's two bundled JPEG
photos) and ``sr-imagenette`` (the 50 held-out Imagenette photos); calibration and training:
Imagenette training photos. These are not Set5/Set14: only the drops from float compare with
the papers.

``--dqss CAND ...`` runs DQSS-PTQ (``lowbit.search.dqss_search``) with those strategies for
weights and activations, then each strategy alone (the same pipeline with one candidate: the same
calibration patches and budget, ``--iters`` search and ``--finetune-iters`` steps per unit), on
``--dqss-config`` (default: the PAMS policy at W4A4), instead of ``--runs``. Its rows hold every
image's PSNR-Y and the per-image differences, DQSS minus each single strategy, with their
standard error (``margins``); they have no ``vs_float``.

``--into FILE`` merges the rows into a committed results file: a row replaces the row of the
same dataset and label.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED  # noqa: E402

from lowbit.cli import main as lowbit_main  # noqa: E402
from lowbit.report import format_table, write_json  # noqa: E402

PAMS = "recipes/pams_edsr_w4a4.yaml"
PAMS2 = "recipes/pams_edsr_w2a4.yaml"
PAMS8 = "recipes/pams_edsr_w8a8.yaml"


def range_runs(method: str) -> dict[str, tuple[str, list[str]]]:
    """The range-calibration rows of ``method`` (minmax, mse): W8A8, W4A4, W2A4 on every layer,
    and W4A4, W2A4 with the PAMS policy."""
    runs = {f"{method} W{w}A{a}": ("ptq", ["--method", method, "--w-bits", w, "--a-bits", a])
            for w, a in (("8", "8"), ("4", "4"), ("2", "4"))}
    for label, config in (("W4A4", PAMS), ("W2A4", PAMS2)):
        runs[f"{method} {label} PAMS policy (body only)"] = (
            "ptq", ["--method", method, "--config", config])
    return runs


# label -> (kind, extra arguments); "PAMS policy": only the body's residual blocks quantized
RUNS = {
    **range_runs("minmax"),
    **range_runs("mse"),
    "rapq W4A4": ("ptq", ["--method", "rapq", "--w-bits", "4", "--a-bits", "4"]),
    "rapq W4A4 PAMS policy (body only)": ("ptq", ["--method", "rapq", "--config", PAMS]),
    "rapq W2A4": ("ptq", ["--method", "rapq", "--w-bits", "2", "--a-bits", "4"]),
    "rapq W2A4 PAMS policy (body only)": ("ptq", ["--method", "rapq", "--config", PAMS2]),
    "rapq W8A8 PAMS policy (body only)": ("ptq", ["--method", "rapq", "--config", PAMS8]),
    "brecq W4A4": ("ptq", ["--method", "brecq", "--w-bits", "4", "--a-bits", "4"]),
    "brecq W4A4 PAMS policy (body only)": ("ptq", ["--method", "brecq", "--config", PAMS]),
    "brecq W2A4 PAMS policy (body only)": ("ptq", ["--method", "brecq", "--config", PAMS2]),
    "brecq W8A8 PAMS policy (body only)": ("ptq", ["--method", "brecq", "--config", PAMS8]),
    "lsq W4A4": ("qat", ["--method", "lsq", "--w-bits", "4", "--a-bits", "4"]),
    "qil W4A4": ("qat", ["--method", "qil", "--w-bits", "4", "--a-bits", "4"]),
    "lsq W2A4": ("qat", ["--method", "lsq", "--w-bits", "2", "--a-bits", "4"]),
    "lsq W4A4 PAMS policy (body only)": ("qat", ["--config", "recipes/pams_edsr_w4a4_lsq.yaml"]),
    "qil W4A4 PAMS policy (body only)": ("qat", ["--config", "recipes/pams_edsr_w4a4_qil.yaml"]),
    # LSQ's 2-bit weights have four levels, as pams_edsr_w2a4.yaml's; QIL's are ternary
    "lsq W2A4 PAMS policy (body only)": ("qat", ["--config", "recipes/pams_edsr_w2a4_lsq.yaml"]),
    "qil W2A4 PAMS policy (body only)": ("qat", ["--config", "recipes/pams_edsr_w2a4_qil.yaml"]),
    "sdq 3 avg bits A4": ("sdq", ["-b", "3"]),
    # 2 bits on average is below what 8-bit head and tail, or every layer at 2 bits, allow:
    # the edges stay float (as PAMS) and a layer may go down to 1 bit
    "sdq 2 avg bits A4, edges float": ("sdq", ["-b", "2", "--first-last", "float",
                                               "--min-bits", "1"]),
}


def _run(cmd: list[str]) -> None:
    if lowbit_main(cmd) != 0:
        raise SystemExit(f"lowbit {' '.join(cmd)} failed")


def per_image(model, loader, spec) -> dict[str, list[float]]:
    """PSNR-Y and SSIM of the model and of bicubic upsampling on every image of ``loader``."""
    from lowbit.evaluate import evaluate

    res = [evaluate(model, [batch], progress=False, spec=spec) for batch in loader]
    return {"psnr_y": [r.psnr_y for r in res], "ssim": [r.ssim for r in res],
            "bicubic_psnr_y": [r.bicubic_psnr_y for r in res],
            "bicubic_ssim": [r.bicubic_ssim for r in res]}


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over the same images and its standard error."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)
    return mean, math.sqrt(var / len(d))


def dqss_rows(args, command: str) -> list[dict]:
    """DQSS-PTQ with ``args.dqss`` and each of its strategies alone, scored image by image."""
    import time

    import torch

    from lowbit.models import get_model, get_spec
    from lowbit.pipeline import build_data
    from lowbit.search import dqss_search

    torch.set_num_threads(1)
    spec = get_spec(args.model)
    net = get_model(args.model, args.weights)
    calib = build_data(spec, args.datasets[0], None, calib_dataset="sr-imagenette",
                       calib_root=args.calib_root, calib_size=args.calib_size,
                       batch_size=32).calib
    batches = list(calib)
    evals = {d: build_data(spec, d, None if d == "sr-sklearn" else args.calib_root,
                           calibration=False).eval for d in args.datasets}
    common = dict(mode="ptq", base_config=args.dqss_config, iters=args.iters,
                  finetune_iters=args.finetune_iters, progress=False)
    plan = [("dqss", args.dqss)] + [(c, [c]) for c in args.dqss]
    scored, info = {"float": {d: per_image(net, ld, spec) for d, ld in evals.items()}}, {}
    for name, cands in plan:
        t0 = time.perf_counter()
        r = dqss_search(net, batches, None, batches[0][0][:2], w_candidates=cands,
                        a_candidates=cands, **common)
        info[name] = dict(seconds=time.perf_counter() - t0, choices=r.counts(),
                          per_layer=r.choices)
        scored[name] = {d: per_image(r.model, ld, spec) for d, ld in evals.items()}
        print(f"{name}: " + ", ".join(f"{d} {sum(v['psnr_y']) / len(v['psnr_y']):.3f} dB"
                                      for d, v in scored[name].items()), flush=True)
    policy = Path(args.dqss_config).stem
    rows = []
    for d in args.datasets:
        fl = scored["float"][d]
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        f_psnr, b_psnr = mean(fl["psnr_y"]), mean(fl["bicubic_psnr_y"])
        rows += [dict(dataset=d, model="bicubic", psnr_y=b_psnr, ssim=mean(fl["bicubic_ssim"]),
                      drop=b_psnr - f_psnr),
                 dict(dataset=d, model="float", psnr_y=f_psnr, ssim=mean(fl["ssim"]), drop=0.0)]
        for name, _ in plan:
            v = scored[name][d]
            label = (f"dqss {{{','.join(args.dqss)}}}" if name == "dqss" else
                     f"dqss-single {name}") + f" ({policy})"
            others = [n for n, _ in plan if n != name]
            margins = ({n: paired(v["psnr_y"], scored[n][d]["psnr_y"]) for n in others}
                       if name == "dqss" else
                       {"dqss": paired(scored["dqss"][d]["psnr_y"], v["psnr_y"])})
            rows.append(dict(dataset=d, model=label, psnr_y=mean(v["psnr_y"]),
                             ssim=mean(v["ssim"]), drop=mean(v["psnr_y"]) - f_psnr,
                             margins=margins,
                             psnr_y_per_image=v["psnr_y"], iters=args.iters,
                             finetune_iters=args.finetune_iters,
                             calib_patches=len(calib.dataset), config=args.dqss_config,
                             command=command, **info[name]))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="edsr_small_x2")
    p.add_argument("--weights", default="builtin")
    p.add_argument("--datasets", nargs="+", default=["sr-sklearn", "sr-imagenette"])
    p.add_argument("--calib-root", default=str(SHARED / "imagenette"))
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=300, help="rapq/brecq reconstruction iterations")
    p.add_argument("--steps", type=int, default=150, help="qat: training steps; sdq: retraining")
    p.add_argument("--search-steps", type=int, default=100, help="sdq: search steps")
    p.add_argument("--patch", type=int, default=48, help="qat/sdq: HR training patch side")
    p.add_argument("--batch-size", type=int, default=16, help="qat/sdq training batch")
    p.add_argument("--lr", type=float, default=1e-5, help="qat: Adam lr of the weights")
    p.add_argument("--quant-lr", type=float, default=1e-4, help="qat: lr of quantizer steps")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--dqss", nargs="+", default=None, metavar="CAND",
                   help="DQSS-PTQ with these strategies and each alone, instead of --runs")
    p.add_argument("--dqss-config", default=PAMS, help="dqss: the config searched on")
    p.add_argument("--finetune-iters", type=int, default=100,
                   help="dqss: steps per unit for the chosen quantizers")
    p.add_argument("--out", default=str(RESULTS / "sr_x2.json"))
    p.add_argument("--into", default=None, help="merge the rows into this results file")
    p.add_argument("--reuse", action="store_true",
                   help="take a row's results file from an earlier run of the same --out "
                   "instead of running its commands again (a stopped benchmark goes on)")
    args = p.parse_args(argv)
    work = Path(args.out).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    calib = ["--calib-dataset", "sr-imagenette", "--calib-root", args.calib_root,
             "--calib-size", str(args.calib_size)]
    train = ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--patch",
             str(args.patch), "--optimizer", "adam", "--lr", str(args.lr), "--quant-lr",
             str(args.quant_lr), "--weight-decay", "0", "--loss", "l1", "--threads", "1",
             "--no-progress", "--overwrite", "--no-eval-float"]
    command = "python benchmarks/sr.py " + " ".join(argv or sys.argv[1:])
    if args.dqss:
        rows = dqss_rows(args, command)
    for dataset in args.datasets if not args.dqss else []:
        root = [] if dataset == "sr-sklearn" else ["--data-root", args.calib_root]
        train_src = ["--train-root", args.calib_root, "--train-dataset", "sr-imagenette"]
        model = ["-m", args.model, "-w", args.weights, "-d", dataset, *root]
        base_rows = None
        for label in args.runs:
            kind, extra = RUNS[label]
            name = f"{dataset}-{label.split(' (')[0].replace(' ', '_')}"
            out = work / f"{name}.json"
            cmds = []
            if kind == "ptq":
                if label.split()[0] in ("rapq", "brecq"):
                    extra = [*extra, "--iters", str(args.iters)]
                cmds.append(["ptq", *model, *calib, "--batch-size", "32", "--threads", "1",
                             "--no-progress", *extra, "-o", str(out)])
            else:
                run_dir = work / name
                config = []
                if kind == "sdq":
                    search_dir = work / f"{name}-search"
                    cmds.append(["search", *model[:4], "-d", "sr-imagenette",
                                 "--data-root", args.calib_root, "--batch-size",
                                 str(args.batch_size), "--steps", str(args.search_steps),
                                 "--check-every", "10", "--threads", "1", "--no-progress",
                                 "--no-plot", "--overwrite", *extra, "-o", str(search_dir)])
                    config = ["--config", str(search_dir / "config.yaml"), "--ebr"]
                cmds.append(["qat", *model, *train_src, *calib, *train, *extra * (kind == "qat"),
                             *config, "-o", str(run_dir)])
                cmds.append(["eval", *model, "--quantized", str(run_dir / "model"),
                             "--threads", "1", "--no-progress", "-o", str(out)])
            if not (args.reuse and out.is_file()):
                for cmd in cmds:
                    _run(cmd)
            res = json.loads(out.read_text())
            if kind == "ptq":
                f, q, seconds = res["float"], res["quantized"], res["ptq_seconds"]
            else:
                q, seconds = res, None
                f = dict(psnr_y=q["reference_psnr_y"], ssim=q["reference_ssim"],
                         bicubic_psnr_y=q["bicubic_psnr_y"], bicubic_ssim=q["bicubic_ssim"])
            if base_rows is None:
                base_rows = [
                    dict(dataset=dataset, model="bicubic", psnr_y=f["bicubic_psnr_y"],
                         ssim=f["bicubic_ssim"], drop=f["bicubic_psnr_y"] - f["psnr_y"]),
                    dict(dataset=dataset, model="float", psnr_y=f["psnr_y"], ssim=f["ssim"],
                         drop=0.0),
                ]
                rows += base_rows
            row = dict(dataset=dataset, model=label, psnr_y=q["psnr_y"], ssim=q["ssim"],
                       drop=q["psnr_y"] - f["psnr_y"], vs_float=q["psnr_vs_reference"],
                       command=" && ".join("lowbit " + " ".join(c) for c in cmds))
            if seconds is not None:
                row["ptq_seconds"] = seconds
            if kind != "ptq":
                row["train_steps"] = args.steps
                if kind == "sdq":
                    found = json.loads((work / f"{name}-search" / "search.json").read_text())
                    row["avg_weight_bits"] = found["achieved"]
                    row["search_steps"] = args.search_steps
            rows.append(row)
    for r in rows:
        r.setdefault("run", command)
    if args.into and Path(args.into).is_file():
        old = json.loads(Path(args.into).read_text())
        for r in old["rows"]:  # rows of a file written before rows named their run
            r.setdefault("run", old["command"])
        new = {(r["dataset"], r["model"]) for r in rows}
        rows = [r for r in old["rows"] if (r["dataset"], r["model"]) not in new] + rows
        order = {d: i for i, d in enumerate(dict.fromkeys(r["dataset"] for r in old["rows"]))}
        rank = {"bicubic": 0, "float": 1}
        rows.sort(key=lambda r: (order.get(r["dataset"], len(order)), rank.get(r["model"], 2)))
    target = args.into or args.out
    write_json(target, {"model": args.model, "weights": args.weights, "rows": rows,
                        "command": "per row: 'run' (the benchmark command) and 'command'"})
    table = [{**r, "psnr_y": f"{r['psnr_y']:.3f}", "ssim": f"{r['ssim']:.4f}",
              "drop": f"{r['drop']:+.3f}",
              "vs_float": f"{r['vs_float']:.2f}" if "vs_float" in r else ""} for r in rows]
    text = format_table(table, ["dataset", "model", "psnr_y", "ssim", "drop", "vs_float"],
                        markdown=True)
    Path(target).with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
