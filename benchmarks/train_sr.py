"""Train a float super-resolution model on the shared trainer (L1 loss, Adam, random HR patches
with flips and 90-degree rotations) and write its weights as safetensors.

This made lowbit's builtin ``edsr_small_x2`` weights (the command is in docs/super_resolution.md).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbit.data import make_loader
from lowbit.data.sr import SRDataset, sr_image_paths
from lowbit.models import get_model, get_spec
from lowbit.qat.checkpoint import CHECKPOINT_NAME, load_checkpoint
from lowbit.qat.trainer import TrainConfig, Trainer


def l1(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).abs().mean()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="edsr_small_x2")
    p.add_argument("--dataset", default="sr-imagenette")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=240, help="steps per epoch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--patch", type=int, default=96, help="HR patch side")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run-dir", required=True, help="checkpoints and logs (resumable)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--export-only", action="store_true",
                   help="write --out from the last checkpoint in --run-dir without training "
                   "(a run stopped at its time limit)")
    args = p.parse_args(argv)
    if args.export_only:
        ckpt = load_checkpoint(Path(args.run_dir) / CHECKPOINT_NAME)
        state = {k: v.contiguous() for k, v in ckpt["model"].items()}
        save_file(state, args.out, metadata={"epochs": str(ckpt["epoch"]),
                                             "steps": str(ckpt["global_step"])})
        print(f"wrote {args.out} from epoch {ckpt['epoch']} (step {ckpt['global_step']})")
        return
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    spec = get_spec(args.model)
    model = get_model(args.model)
    paths, _ = sr_image_paths(args.dataset, args.data_root, "train")
    data = SRDataset(paths, spec.scale, spec.mean, spec.std, patch=args.patch, augment=True)
    loader = make_loader(data, args.batch_size, shuffle=True, seed=args.seed)
    cfg = TrainConfig(epochs=args.epochs, max_steps_per_epoch=args.steps, optimizer="adam",
                      lr=args.lr, weight_decay=0.0, quant_lr=None, schedule="cosine",
                      warmup_steps=50, channels_last=False, log_every=20, seed=args.seed,
                      progress=False)
    trainer = Trainer(model, loader, cfg, output_dir=args.run_dir, criterion=l1, float_ok=True,
                      run_info={"model": args.model, "dataset": args.dataset,
                                "patch": args.patch, "batch_size": args.batch_size})
    trainer.fit(resume=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
