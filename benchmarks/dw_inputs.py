"""Channel ranges at the inputs of depthwise convs: what one per-tensor scale does to them.

For every depthwise conv of a model, over calibration images, each input channel's maximum is
compared with the tensor's: a channel whose values all lie below half a quantization step of
a per-tensor min-max scale at ``--bits`` rounds to zero everywhere, and the depthwise conv,
which reads that channel alone, loses it. Per-channel input scales
(``QuantConfig.uniform(dw_act_per_channel=True)``) keep it. Results:
benchmarks/results/dw_inputs.json.

    python benchmarks/dw_inputs.py --models mobilenet_v2_tflite efficientnet_lite0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, RESULTS, data_root, weights  # noqa: E402


def stats(model_name: str, images: int, bits: int) -> list[dict]:
    import torch

    from lowbit.models import get_model, get_spec
    from lowbit.pipeline import build_data

    spec = get_spec(model_name)
    data = build_data(spec, MODELS[model_name]["dataset"], data_root(MODELS[model_name]["dataset"]),
                      calib_size=1024, batch_size=64)
    net = get_model(model_name, weights(model_name)).eval()
    dws = {n: m for n, m in net.named_modules()
           if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}
    hi: dict[str, torch.Tensor] = {}
    lo: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, inputs, out):
            x = inputs[0].detach()
            h, l_ = x.amax((0, 2, 3)), x.amin((0, 2, 3))
            hi[name] = torch.maximum(hi[name], h) if name in hi else h
            lo[name] = torch.minimum(lo[name], l_) if name in lo else l_
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in dws.items()]
    seen = 0
    with torch.no_grad():
        for batch in data.calib:
            net(batch[0])
            seen += batch[0].shape[0]
            if seen >= images:
                break
    for h in handles:
        h.remove()
    rows = []
    for name in dws:
        t_lo, t_hi = min(float(lo[name].min()), 0.0), float(hi[name].max())
        step = (t_hi - t_lo) / (2 ** bits - 1)
        reach = torch.maximum(hi[name].abs(), lo[name].abs())  # farthest value from zero
        rows.append(dict(
            model=model_name, layer=name, channels=int(hi[name].numel()), images=seen, bits=bits,
            tensor_max=t_hi, dead=int((reach == 0).sum()),
            below_half_step=int(((reach > 0) & (reach < step / 2)).sum()),
            below_two_steps=int(((reach > 0) & (reach < 2 * step)).sum()),
        ))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2_tflite"],
                    choices=[m for m, i in MODELS.items() if i["dataset"] != "cifar10"])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "dw_inputs"))
    args = ap.parse_args()
    import torch

    from lowbit.report.tables import write_json

    torch.set_num_threads(2)
    rows = [r for m in args.models for r in stats(m, args.images, args.bits)]
    command = "python benchmarks/dw_inputs.py --models " + " ".join(args.models)
    for r in rows:
        r["command"] = command
        print(f"{r['model']:<20} {r['layer']:<24} {r['channels']:>4} ch  dead {r['dead']:>3}  "
              f"< step/2 {r['below_half_step']:>3}  < 2 steps {r['below_two_steps']:>3}")
    write_json(Path(args.out).with_suffix(".json"), {"rows": rows})


if __name__ == "__main__":
    main()
