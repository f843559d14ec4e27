"""Power-of-two rescaling (``pot_rescale``): the network output error RAPQ starts from.

For each model and rescaling mode (none, ``depthwise``; ``all`` was measured and removed), the model is prepared with
power-of-two quantizers at the least-error exponents (RAPQ's start, no scale adjustment:
``rapq-quick`` with 0 steps) and its output error against the float model is measured on the
calibration images; the same for float (non-PoT) MSE scales, the error a float-scale method
starts from. Everything else (the scale search, reconstruction) is left out, so the rows
isolate what rescaling does to the PoT grid fit. Results: benchmarks/results/pot_rescale.json.

    python benchmarks/pot_rescale.py --models mobilenet_v2_tflite efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, RESULTS, data_root, weights  # noqa: E402

MODES = ("none", "depthwise")


def measure(model_name: str, images: int, w_bits: int, a_bits: int, dw: bool,
            modes=MODES) -> list[dict]:
    import torch

    from lowbit.config import QuantConfig
    from lowbit.models import get_model, get_spec
    from lowbit.pipeline import build_data
    from lowbit.ptq import ptq
    from lowbit.ptq.rapq import _calibrated, _outputs, gather_inputs, with_kind
    from lowbit.ptq.reconstruct import output_error

    info = MODELS[model_name]
    data = build_data(get_spec(model_name), info["dataset"], data_root(info["dataset"]),
                      calib_size=images, batch_size=64, workers=0)
    net = get_model(model_name, weights(model_name)).to(memory_format=torch.channels_last)
    config = QuantConfig.uniform(w_bits, a_bits, dw_act_per_channel=dw)
    rows = []
    base = dict(model=model_name, w_bits=w_bits, a_bits=a_bits, dw_act_per_channel=dw,
                images=images)
    for mode in modes:
        t = time.perf_counter()
        q = ptq(net, "rapq-quick", data.calib, config, data.example, quick_iters=0,
                pot_rescale=None if mode == "none" else mode, progress=False)
        rep = q.lowbit_rapq.get("pot_rescale") or {}
        rows.append(dict(base, scales="pot", rescale=mode,
                         start_error=q.lowbit_rapq["quick"]["naive_error"],
                         pairs=len(rep.get("rescaled", {})),
                         seconds_rescale=rep.get("seconds"),
                         seconds=time.perf_counter() - t))
    x = gather_inputs(data.calib)
    q = _calibrated(net, with_kind(config, "uniform", "mse"), x, data.example, 64, False)
    err = output_error(_outputs(q, x, 64, False), _outputs(q, x, 64, True)).item()
    rows.append(dict(base, scales="float", rescale="none", start_error=err, pairs=0))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2_tflite"],
                    choices=[m for m, i in MODELS.items() if i["dataset"] != "cifar10"])
    ap.add_argument("--images", type=int, default=256, help="calibration images (error on all)")
    ap.add_argument("--setting", default="W4A4", choices=["W4A4", "W4A8", "W2A4", "W8A4"])
    ap.add_argument("--per-tensor-dw", action="store_true",
                    help="one activation scale per tensor at depthwise inputs (default: per channel)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "pot_rescale"))
    args = ap.parse_args()
    import torch

    from lowbit.report.tables import write_json

    torch.set_num_threads(args.threads)
    w, a = int(args.setting[1]), int(args.setting[3])
    out = Path(args.out).with_suffix(".json")
    command = ("python benchmarks/pot_rescale.py --models " + " ".join(args.models)
               + f" --images {args.images} --setting {args.setting} --threads {args.threads}"
               + (" --per-tensor-dw" if args.per_tensor_dw else "")
               + ("" if args.modes == list(MODES) else " --modes " + " ".join(args.modes)))
    old = json.loads(out.read_text())["rows"] if out.is_file() else []
    for m in args.models:
        rows = measure(m, args.images, w, a, not args.per_tensor_dw, args.modes)
        for r in rows:
            r["command"] = command
            print(f"{m:<20} {args.setting} {r['scales']:<5} rescale {r['rescale']:<9} "
                  f"start error {r['start_error']:.1f}  ({r['pairs']} rescaled)", flush=True)
        def key(r):
            return r["model"], r["w_bits"], r["a_bits"], r["dw_act_per_channel"], r["scales"], \
                r["rescale"]

        new = {key(r) for r in rows}
        old = [r for r in old if key(r) not in new]
        old += rows
        write_json(out, {"rows": old})


if __name__ == "__main__":
    main()
