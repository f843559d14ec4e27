"""Small helpers shared across lowbit: atomic writes, device lookup."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so a crash never leaves it half-written."""
    atomic_write(path, lambda p: Path(p).write_text(text))


def atomic_write(path: str | Path, writer) -> None:
    """Call ``writer(tmp_path)`` then rename onto ``path`` (same directory, atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU if it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def batch_inputs(batch):
    """The model input of a data batch: a tensor, the first item of ``(input, target)``, or the
    ``input``/``image`` entry of a dict."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        return batch.get("input", batch.get("image"))
    return batch
