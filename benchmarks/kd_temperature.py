"""Why distillation broke 3-bit QIL training at temperature 4: gradient sizes and early steps.

From the pretrained ResNet-20, the QIL W3A3 model of ``benchmarks/qat.py`` (per-channel
weights, first/last 8 bits, BN folded, MSE-initialised on 1,024 training images) is built
once; then (a) the global gradient norm of the cross-entropy and of ``T^2 * KL`` at each
temperature on one training batch of 128, and (b) top-1 on 1,000 test images after 1 and
after 30 SGD steps of the benchmark's recipe (lr 5e-4 / quantizers 5e-3, cosine over the
steps) with the KD term at each temperature, or none.

    python benchmarks/kd_temperature.py

Results: benchmarks/results/kd_temperature.{csv,json}.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, data_root, save_rows, weights  # noqa: E402

TEMPERATURES = [None, 1.0, 2.0, 4.0]
FIELDS = ["kd_temperature", "grad_norm_ce", "grad_norm_kd", "steps", "top1", "command"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 30])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from lowbit import calibrate, evaluate, prepare
    from lowbit.data import load_dataset, make_loader
    from lowbit.losses import as_hook
    from lowbit.losses.distill import KnowledgeDistillation, kd_loss
    from lowbit.models import get_model, get_spec
    from lowbit.pipeline import build_data
    from lowbit.qat.api import method_config
    from lowbit.qat.schedule import Stage, run_stages
    from lowbit.qat.trainer import TrainConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = data_root("cifar10")
    spec = get_spec("resnet20")
    data = build_data(spec, "cifar10", root, calib_size=1024, eval_size=1000, batch_size=256,
                      seed=0)
    train_set = load_dataset("cifar10", root, "train", mean=spec.mean, std=spec.std, crop=32)
    model = get_model("resnet20", weights("resnet20")).eval()
    cfg = method_config("qil", 3, 3, per_channel=True, first_last="8bit", observer="mse",
                        bn="fold")
    base = prepare(model, cfg, data.example)
    calibrate(base, data.calib, progress=False)

    x, y = next(iter(make_loader(train_set, 128, shuffle=True, seed=0)))
    probe = copy.deepcopy(base).train()
    out = probe(x)
    with torch.no_grad():
        teacher = model(x)

    def grad_norm(loss) -> float:
        probe.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return float(torch.sqrt(sum((p.grad ** 2).sum() for p in probe.parameters()
                                    if p.grad is not None)))

    ce_norm = grad_norm(F.cross_entropy(out, y))
    kd_norms = {t: grad_norm(kd_loss(out, teacher, t)) for t in TEMPERATURES if t}

    rows = []
    cmd = "python benchmarks/kd_temperature.py --steps " + " ".join(map(str, args.steps))
    for steps in args.steps:
        for t in TEMPERATURES:
            q = copy.deepcopy(base)
            hooks = [as_hook(KnowledgeDistillation(model, t, 1.0))] if t else []
            train = TrainConfig(epochs=1, max_steps_per_epoch=steps, optimizer="sgd", lr=5e-4,
                                quant_lr=5e-3, weight_decay=1e-4, schedule="cosine",
                                progress=False, augment="crop-flip", bn="fold", seed=0)
            loader = make_loader(train_set, 128, shuffle=True, seed=0)
            run_stages(q, [Stage(w_bits=3, a_bits=3)], lambda s: cfg, loader, train,
                       hooks=hooks, output_dir=None, run_info={}, eval_fn=None)
            top1 = evaluate(q.eval(), data.eval, progress=False).top1
            rows.append(dict(kd_temperature=t, grad_norm_ce=ce_norm,
                             grad_norm_kd=kd_norms.get(t), steps=steps, top1=top1, command=cmd))
            print(f"T={t} steps={steps}: top-1 {top1:.2f}  grad CE {ce_norm:.1f} "
                  f"KD {kd_norms.get(t) or 0:.1f}", flush=True)
    save_rows(RESULTS / "kd_temperature", rows, FIELDS)


if __name__ == "__main__":
    main()
