"""Super-resolution benchmark: bicubic, float and quantized rows of an EDSR model at one scale,
through the command line (each row is one or more CLI runs, their results files kept).

Run kinds: ``ptq`` (one ``lowbit ptq``), ``qat`` (``lowbit qat`` with an L1 loss, then
``lowbit eval --quantized`` of the trained model against the float one) and ``sdq``
(``lowbit search`` to an average-weight-bits budget, the found config retrained by ``lowbit
qat``, then evaluated). Evaluation images: ``sr-sklearn`` (scikit-learn's two bundled JPEG
photos) and ``sr-imagenette`` (the 50 held-out Imagenette photos); calibration and training:
Imagenette training photos. These are not Set5/Set14: only the drops from float compare with
the papers.

``--into FILE`` merges the rows into a committed results file: a row replaces the row of the
same dataset and label.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED  # noqa: E402

from lowbit.cli import main as lowbit_main  # noqa: E402
from lowbit.report import format_table, write_json  # noqa: E402

PAMS = "recipes/pams_edsr_w4a4.yaml"
# label -> (kind, extra arguments); "PAMS policy": only the body's residual blocks quantized
RUNS = {
    "mse W8A8": ("ptq", ["--method", "mse", "--w-bits", "8", "--a-bits", "8"]),
    "mse W4A4": ("ptq", ["--method", "mse", "--w-bits", "4", "--a-bits", "4"]),
    "mse W2A4": ("ptq", ["--method", "mse", "--w-bits", "2", "--a-bits", "4"]),
    "mse W4A4 PAMS policy (body only)": ("ptq", ["--method", "mse", "--config", PAMS]),
    "mse W2A4 PAMS policy (body only)": ("ptq", ["--method", "mse", "--config",
                                                 "recipes/pams_edsr_w2a4.yaml"]),
    "rapq W4A4": ("ptq", ["--method", "rapq", "--w-bits", "4", "--a-bits", "4"]),
    "rapq W4A4 PAMS policy (body only)": ("ptq", ["--method", "rapq", "--config", PAMS]),
    "brecq W4A4": ("ptq", ["--method", "brecq", "--w-bits", "4", "--a-bits", "4"]),
    "brecq W4A4 PAMS policy (body only)": ("ptq", ["--method", "brecq", "--config", PAMS]),
    "lsq W4A4": ("qat", ["--method", "lsq", "--w-bits", "4", "--a-bits", "4"]),
    "qil W4A4": ("qat", ["--method", "qil", "--w-bits", "4", "--a-bits", "4"]),
    "lsq W2A4": ("qat", ["--method", "lsq", "--w-bits", "2", "--a-bits", "4"]),
    "lsq W4A4 PAMS policy (body only)": ("qat", ["--config", "recipes/pams_edsr_w4a4_lsq.yaml"]),
    "sdq 3 avg bits A4": ("sdq", ["-b", "3"]),
    "sdq 2 avg bits A4": ("sdq", ["-b", "2"]),
}


def _run(cmd: list[str]) -> None:
    if lowbit_main(cmd) != 0:
        raise SystemExit(f"lowbit {' '.join(cmd)} failed")


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
    for dataset in args.datasets:
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
    command = "python benchmarks/sr.py " + " ".join(argv or sys.argv[1:])
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
