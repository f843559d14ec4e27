"""Paired top-1 difference of two trained CIFAR-10 models, rebuilt from their trainer checkpoints.

Long QAT runs (``sdq.py --checkpoint-dir``, ``qat.py runs --log-dir``) leave a checkpoint whose
``run`` record holds the whole quantization config; this rebuilds each model from it, scores
both on the same test images and writes their difference with its paired standard error (the
rows of the runs themselves keep only their own top-1).

    python benchmarks/pair_checkpoints.py --a runs/long/sdq_w2afloat --b runs/long/lsq_w2afloat \\
        --label "SDQ vs uniform LSQ, 2 bits, float A, 30 epochs" --out pairs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, data_root, load_rows, provenance, save_rows, weights  # noqa: E402

FIELDS = ["label", "model", "a", "b", "a_epochs", "b_epochs", "a_top1", "b_top1", "difference",
          "difference_se", "agreement", "images", "command", "torch", "commit"]


def rebuild(folder: Path, model_name: str, example):
    """The trained model of the checkpoint in ``folder`` and the epochs it had trained."""
    import torch

    from lowbit.config import QuantConfig
    from lowbit.models import get_model
    from lowbit.prepare import prepare, set_mode
    from lowbit.qat.checkpoint import load_checkpoint

    path = folder / "checkpoint.pt" if folder.is_dir() else folder
    if not path.is_file():
        raise SystemExit(f"no trainer checkpoint at {path}: give the folder a run checkpointed to")
    ckpt = load_checkpoint(path)
    run = ckpt.get("run") or {}
    if "quant" not in run:
        raise SystemExit(f"{path} records no quantization config; it predates run records")
    model = prepare(get_model(model_name, weights(model_name)).eval(),
                    QuantConfig.model_validate(run["quant"]), example)
    model.load_state_dict(ckpt["model"])
    set_mode(model, "quantize")
    return model.eval().to(memory_format=torch.channels_last), int(ckpt["epoch"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, type=Path, help="checkpoint folder (or file) of run A")
    ap.add_argument("--b", required=True, type=Path, help="checkpoint folder (or file) of run B")
    ap.add_argument("--label", required=True, help="what is compared (the row's key)")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="pairs", help="results file stem under benchmarks/results")
    a = ap.parse_args()
    import torch

    import lowbit
    from lowbit.models import get_spec
    from lowbit.pipeline import build_data

    torch.set_num_threads(a.threads)
    spec = get_spec(a.model)
    data = build_data(spec, "cifar10", data_root("cifar10"), calib_size=1024, batch_size=256)
    model_a, epochs_a = rebuild(a.a, a.model, data.example)
    model_b, epochs_b = rebuild(a.b, a.model, data.example)
    r = lowbit.evaluate(model_a, data.eval, reference=model_b, progress=False)
    row = dict(label=a.label, model=a.model, a=str(a.a), b=str(a.b), a_epochs=epochs_a,
               b_epochs=epochs_b, a_top1=r.top1, b_top1=r.reference_top1,
               difference=r.top1 - r.reference_top1, difference_se=r.delta_se,
               agreement=r.agreement, images=r.samples,
               command=f"python benchmarks/pair_checkpoints.py --a {a.a} --b {a.b} --label "
                       f"{a.label!r} --model {a.model} --out {a.out}", **provenance())
    print(f"{a.label}: A {r.top1:.2f} ({epochs_a} epochs), B {r.reference_top1:.2f} "
          f"({epochs_b} epochs), A - B {row['difference']:+.2f} +- {r.delta_se:.2f} (paired, "
          f"{r.samples} images)")
    out = RESULTS / a.out
    rows = [x for x in load_rows(out) if x["label"] != a.label] + [row]
    save_rows(out, rows, FIELDS)


if __name__ == "__main__":
    main()
