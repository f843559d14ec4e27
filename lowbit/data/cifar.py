"""CIFAR-10/100 from the standard python-version archive layout, held in memory as uint8.

Images stay as one uint8 tensor [N, 3, 32, 32] (150 MB for the CIFAR-10 training set instead of
600 MB as float32) and are normalised on access, which costs far less than a forward pass.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lowbit.errors import DataError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_FILES = {"train": ["train"], "test": ["test"]}

# The batch files are pickles; only the numpy globals a CIFAR batch needs may be loaded, so a
# tampered file cannot run code when it is read.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


class InMemoryImageDataset(Dataset):
    """uint8 images [N, C, H, W] plus labels, normalised as ``(p - mean) / std`` when read.

    Shared by CIFAR and sklearn digits: both fit in memory, so decoding happens once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str] = (),
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(
                f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = (self.images[index].float() - self.mean) / self.std
        return x, int(self.labels[index])

    def batch(
        self, indices: Sequence[int] | torch.Tensor, channels_last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise a whole batch in one op: faster than a DataLoader for in-memory data."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        raw = self.images[idx]
        if channels_last:
            raw = raw.contiguous(memory_format=torch.channels_last)
        x = (raw.float() - self.mean) / self.std
        return x, self.labels[idx]


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except _ForbiddenGlobal as exc:
        raise DataError(
            f"refusing to read CIFAR batch file {path}: it holds unexpected object {exc}, which "
            "a CIFAR batch never contains"
        ) from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        ImportError,
        UnicodeDecodeError,
        MemoryError,
    ) as exc:
        raise DataError(
            f"could not read CIFAR batch file {path}: {exc}. The file is corrupt or truncated; "
            "extract the python-version archive again."
        ) from exc
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR batch file {path} holds a {type(entry).__name__}, expected a dict")
    return entry


def _images_and_labels(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    entry = _read_batch(path)
    missing = [k for k in ("data", label_key) if k not in entry]
    if missing:
        raise DataError(f"CIFAR batch file {path} lacks key(s) {missing}; found {sorted(entry)}")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"CIFAR batch file {path}: 'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]"
        )
    if labels.shape != (len(data),):
        raise DataError(f"CIFAR batch file {path}: {len(data)} images but {labels.size} labels")
    return data, labels


def read_cifar(
    folder: Path, split: str, hundred: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read one split of an extracted archive into (uint8 [N, 3, 32, 32], int64 [N], names).

    The layout was checked by the caller; bad contents raise ``DataError``.
    """
    files = (CIFAR100_FILES if hundred else CIFAR10_FILES)[split]
    label_key = "fine_labels" if hundred else "labels"
    parts = [_images_and_labels(folder / name, label_key) for name in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    num_classes = 100 if hundred else 10
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"CIFAR labels in {folder} range {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
    images = torch.from_numpy(data.reshape(len(data), 3, 32, 32))
    return images, torch.from_numpy(labels), _class_names(folder, hundred, num_classes)


def _class_names(folder: Path, hundred: bool, num_classes: int) -> list[str]:
    meta_path = folder / ("meta" if hundred else "batches.meta")
    key = "fine_label_names" if hundred else "label_names"
    if not meta_path.is_file():
        return [str(i) for i in range(num_classes)]
    names = _read_batch(meta_path).get(key)
    if not isinstance(names, list) or len(names) != num_classes:
        return [str(i) for i in range(num_classes)]
    return [str(n) for n in names]
