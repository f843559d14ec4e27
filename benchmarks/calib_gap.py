"""How much of a saved quantized model's drop from float is fitting to its calibration images.

Evaluates a model saved by ``rapq.py --save`` (or ``lowbit ptq --save``) on the images it was
calibrated on and on the held-out evaluation images of the same protocol, each against float on
the same images. A drop much smaller on the calibration images than on the held-out ones means
the reconstruction fitted its calibration set rather than the task. ``--against DIR`` adds the
paired difference from another saved model of the same protocol on the held-out images.
``--variant`` asks where the gap sits: ``float-activations`` removes every input quantizer,
``nearest-8bit`` / ``nearest-all`` replace the learned rounding of the 8-bit (first and last) /
of every layer's weights by nearest rounding at the same scales; ``float-from`` runs every layer
from ``--from-layer`` on (in execution order) in float, weights and inputs.

    python benchmarks/calib_gap.py --model mobilenet_v2_tflite \\
        --quantized runs/saved/mobilenet_v2_tflite-rapq-W4A8-diverse --out /tmp/gap
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402,E501
    MODELS,
    PROTOCOLS,
    RESULTS,
    load_rows,
    protocol_data,
    provenance,
    save_rows,
    saved_meta,
    weights,
)

FIELDS = ["model", "quantized", "variant", "method", "iters", "w_bits", "a_bits", "protocol_name",
          "images", "n", "top1", "float_top1", "drop", "drop_se", "agreement", "against", "against_top1",
          "gain", "gain_se", "load_avg_start", "threads", "torch", "commit", "command"]


VARIANTS = ("as-saved", "float-activations", "nearest-8bit", "nearest-all", "float-from")


def apply_variant(q, variant: str, float_model, example, from_layer: str | None = None) -> int:
    """Change the loaded model ``q`` as ``variant`` says; returns how many layers changed.

    Nearest rounding: the float (BN-folded) weights go back into the layer, whose weight
    quantizer then rounds them to nearest on its saved grid."""
    from lowbit.prepare import prepare, quant_layers

    if variant == "as-saved":
        return 0
    layers = list(quant_layers(q))
    if variant == "float-activations":
        for _, layer in layers:
            layer.input_quant = None
        return len(layers)
    folded = dict(quant_layers(prepare(float_model, q.lowbit_config, example)))
    if variant == "float-from":
        names = [n for n, _ in layers]
        start = next((i for i, n in enumerate(names)
                      if n == from_layer or n.startswith(f"{from_layer}.")), None)
        if start is None:
            raise SystemExit(f"--from-layer {from_layer!r} names no quantized layer; the first "
                             f"are {names[:3]}")
        for name, layer in layers[start:]:
            layer.weight.data.copy_(folded[name].weight.data)
            layer.weight_quant = layer.input_quant = layer.bias_quant = None
        return len(layers) - start
    changed = 0
    for name, layer in layers:
        if layer.weight_quant is None or (variant == "nearest-8bit" and layer.w_bits != 8):
            continue
        layer.weight.data.copy_(folded[name].weight.data)
        changed += 1
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=list(MODELS))
    ap.add_argument("--quantized", required=True, metavar="DIR",
                    help="a folder written by rapq.py --save or lowbit ptq --save")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="another saved model: top-1 difference from it on the held-out images, "
                    "paired per image")
    ap.add_argument("--protocol", default="diverse", choices=PROTOCOLS)
    ap.add_argument("--variant", default="as-saved", choices=list(VARIANTS),
                    help="evaluate the saved model as saved, or with its activations in float, "
                    "or with nearest rounding in its 8-bit layers or in every layer, or float "
                    "from --from-layer on")
    ap.add_argument("--from-layer", default=None, metavar="NAME",
                    help="float-from: the first layer (or module prefix, e.g. features.7) run "
                    "in float")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "calib_gap"))
    a = ap.parse_args()
    earlier = load_rows(Path(a.out))
    if any("quantized" not in r or "images" not in r for r in earlier):
        raise SystemExit(f"{Path(a.out).with_suffix('.json')} holds rows of another benchmark: "
                         "give --out a new file or one written by calib_gap.py")
    import torch

    import lowbit
    from lowbit.models import get_model
    from lowbit.pipeline import load_quantized

    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]
    data = protocol_data(a.model, a.protocol, calib_size=1024, batch_size=64, workers=0)
    meta = saved_meta(a.quantized, a.model, data)
    if a.against:
        saved_meta(a.against, a.model, data)
    net = get_model(a.model, weights(a.model)).eval()
    q = load_quantized(get_model(a.model, weights(a.model)).eval(), a.quantized, data.example)
    cfg = q.lowbit_config
    if (a.variant == "float-from") != (a.from_layer is not None):
        raise SystemExit("--from-layer goes with --variant float-from, and only with it")
    changed = apply_variant(q, a.variant, net, data.example, a.from_layer)
    if a.variant != "as-saved":
        print(f"{a.variant}: {changed} layers changed")
    command = (f"python benchmarks/calib_gap.py --model {a.model} --quantized {a.quantized} "
               + (f"--against {a.against} " if a.against else "")
               + (f"--variant {a.variant} " if a.variant != "as-saved" else "")
               + (f"--from-layer {a.from_layer} " if a.from_layer else "")
               + f"--protocol {a.protocol} --threads {a.threads}")
    rows = []
    for name, loader in (("calibration", data.calib), ("held-out evaluation", data.eval)):
        r = lowbit.evaluate(q, loader, reference=net, progress=False)
        rows.append(dict(
            model=a.model, quantized=Path(a.quantized).name,
            variant=a.variant + (f":{a.from_layer}" if a.from_layer else ""),
            method=meta.get("method"),
            iters=(meta.get("method_config") or {}).get("iters"),
            w_bits=cfg.weight.bits if cfg.weight else 32, a_bits=cfg.act.bits if cfg.act else 32,
            protocol_name=a.protocol, images=name, n=r.samples, top1=r.top1,
            float_top1=r.reference_top1, drop=r.reference_top1 - r.top1, drop_se=r.delta_se,
            agreement=r.agreement, load_avg_start=load, threads=a.threads, command=command,
            **provenance()))
        print(f"{name}: top-1 {r.top1:.2f} (float {r.reference_top1:.2f}, drop "
              f"{r.reference_top1 - r.top1:.2f} +- {r.delta_se:.2f}, agreement "
              f"{r.agreement:.1f} %, {r.samples} images)", flush=True)
    if a.against:
        other = load_quantized(get_model(a.model, weights(a.model)).eval(), a.against,
                               data.example)
        r = lowbit.evaluate(q, data.eval, reference=other, progress=False)
        rows[-1].update(against=Path(a.against).name, against_top1=r.reference_top1,
                        gain=r.top1 - r.reference_top1, gain_se=r.delta_se)
        print(f"against {Path(a.against).name}: {r.reference_top1:.2f}, difference "
              f"{r.top1 - r.reference_top1:+.2f} +- {r.delta_se:.2f} (paired)", flush=True)
    out = Path(a.out)

    def key(r):
        return r["quantized"], r.get("variant") or "as-saved", r["images"]

    keep = [r for r in earlier if key(r) not in {key(n) for n in rows}]
    save_rows(out, keep + rows, FIELDS)


if __name__ == "__main__":
    main()
