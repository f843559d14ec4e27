"""Super-resolution PTQ benchmark: bicubic, float and quantized rows of an EDSR model at one
scale, through ``lowbit ptq`` (each row is one CLI run with its results file kept).

Evaluation images: ``sr-sklearn`` (scikit-learn's two bundled JPEG photos) and ``sr-imagenette``
(the 50 held-out Imagenette photos); calibration: seeded LR patches of Imagenette training
photos. These are not Set5/Set14: only the drops from float compare with the papers.
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

# label -> extra ptq arguments
RUNS = {
    "mse W8A8": ["--method", "mse", "--w-bits", "8", "--a-bits", "8"],
    "mse W4A4": ["--method", "mse", "--w-bits", "4", "--a-bits", "4"],
    "mse W4A4 PAMS policy (body only)": ["--method", "mse", "--config",
                                         "recipes/pams_edsr_w4a4.yaml"],
    "rapq W4A4": ["--method", "rapq", "--w-bits", "4", "--a-bits", "4"],
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="edsr_small_x2")
    p.add_argument("--weights", default="builtin")
    p.add_argument("--datasets", nargs="+", default=["sr-sklearn", "sr-imagenette"])
    p.add_argument("--calib-root", default=str(SHARED / "imagenette"))
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=300, help="rapq reconstruction iterations")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--out", default=str(RESULTS / "sr_x2.json"))
    args = p.parse_args(argv)
    work = Path(args.out).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in args.datasets:
        root = [] if dataset == "sr-sklearn" else ["--data-root", args.calib_root]
        base_rows = None
        for label in args.runs:
            extra = list(RUNS[label])
            if "rapq" in label:
                extra += ["--iters", str(args.iters)]
            out = work / f"{dataset}-{label.split(' (')[0].replace(' ', '_')}.json"
            cmd = ["ptq", "-m", args.model, "-w", args.weights, "-d", dataset, *root,
                   "--calib-dataset", "sr-imagenette", "--calib-root", args.calib_root,
                   "--calib-size", str(args.calib_size), "--batch-size", "32", "--threads", "1",
                   "--no-progress", *extra, "-o", str(out)]
            if lowbit_main(cmd) != 0:
                raise SystemExit(f"lowbit {' '.join(cmd)} failed")
            res = json.loads(out.read_text())
            f, q = res["float"], res["quantized"]
            if base_rows is None:
                base_rows = [
                    dict(dataset=dataset, model="bicubic", psnr_y=f["bicubic_psnr_y"],
                         ssim=f["bicubic_ssim"], drop=f["bicubic_psnr_y"] - f["psnr_y"]),
                    dict(dataset=dataset, model="float", psnr_y=f["psnr_y"], ssim=f["ssim"],
                         drop=0.0),
                ]
                rows += base_rows
            rows.append(dict(dataset=dataset, model=label, psnr_y=q["psnr_y"], ssim=q["ssim"],
                             drop=q["psnr_y"] - f["psnr_y"], vs_float=q["psnr_vs_reference"],
                             command="lowbit " + " ".join(cmd), ptq_seconds=res["ptq_seconds"]))
    write_json(args.out, {"model": args.model, "weights": args.weights, "rows": rows,
                          "command": "python benchmarks/sr.py " + " ".join(argv or sys.argv[1:])})
    table = [{**r, "psnr_y": f"{r['psnr_y']:.3f}", "ssim": f"{r['ssim']:.4f}",
              "drop": f"{r['drop']:+.3f}",
              "vs_float": f"{r['vs_float']:.2f}" if "vs_float" in r else ""} for r in rows]
    text = format_table(table, ["dataset", "model", "psnr_y", "ssim", "drop", "vs_float"],
                        markdown=True)
    Path(args.out).with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
