"""Training checkpoints: plain state dicts, tensors and primitives, written atomically.

A checkpoint records what run it belongs to (model name, method, quantization and training
config, stage list); resuming with anything else is refused with the differing fields named,
because silently continuing another run gives numbers that belong to neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from ..utils import atomic_write

FORMAT = "lowbit-qat-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (with the format tag) so a crash leaves the previous file intact."""
    path = Path(path)
    data = {"format": FORMAT, **payload}
    atomic_write(path, lambda p: torch.save(data, p))
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}; start without --resume or pass its folder")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(
            f"could not read checkpoint {path}: {exc}; the file is corrupt or not a lowbit "
            "checkpoint"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a lowbit QAT checkpoint (expected format {FORMAT})")
    return data


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} ({b!r} in the checkpoint, {a!r} now)"]


def _without_epochs(run: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in (run.get("train") or {}).items() if k != "epochs"}
    return {**run, "train": train}


def check_run(expected: dict[str, Any], ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint from another model, method or configuration. The epoch count may
    differ: a resumed run may be extended (the trainer refuses one shortened below what the
    checkpoint has already trained)."""
    found = ckpt.get("run", {})
    for key in ("model", "method"):
        if expected.get(key) != found.get(key):
            raise TrainingError(
                f"checkpoint {path} belongs to {key} {found.get(key)!r}, not "
                f"{expected.get(key)!r}; resume with the same {key} or use a new output folder"
            )
    diffs = _diff(_without_epochs(expected), _without_epochs(found))
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise TrainingError(
            f"checkpoint {path} was written by a run with other settings: {shown}. Resume with "
            "the original settings or start a new output folder"
        )
