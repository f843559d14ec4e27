"""Any folder of images, without labels: training data for label-free (distillation) QAT and
calibration images of one's own.

Images are found at any depth (flat, nested, or in class folders whose names are ignored), in
sorted order so a seeded subset or shuffle is reproducible. Each is resized (short side) and
centre-cropped to the model's input; augmentation is the trainer's batch ``augment``.
Every target is :data:`UNLABELED`, so code that reads targets can tell there are none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lowbit.data.imagefolder import IMAGE_SUFFIXES, resize_center_crop
from lowbit.errors import DataError

UNLABELED = -1  # the target of an image without a label (never a class index)

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError,
                  Image.DecompressionBombError)


def scan_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (hidden files and folders skipped), sorted; each is
    opened once (header only), so a file that is no image fails here, before any training."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found: pass an existing folder of images")
    paths = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not paths:
        raise DataError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder} or its subfolders: "
            "pass a folder that holds image files"
        )
    bad = []
    for path in paths:
        try:
            with Image.open(path):
                pass
        except _DECODE_ERRORS as exc:
            bad.append(f"{path} ({exc})")
    if bad:
        raise DataError(
            f"{len(bad)} of {len(paths)} files in {folder} are not readable images, e.g. "
            f"{bad[0]}: remove or replace them"
        )
    return paths


class UnlabeledImageFolder(Dataset):
    """Decodes one image per access, as ``(float32 [C, crop, crop], UNLABELED)`` normalised as
    ``(pixel - mean) / std``; ``channels`` 1 reads images as greyscale."""

    labeled = False

    def __init__(
        self,
        paths: Sequence[Path],
        mean: Sequence[float],
        std: Sequence[float],
        resize: int,
        crop: int,
        channels: int = 3,
    ) -> None:
        if resize < 1 or crop < 1 or crop > resize:
            raise DataError(f"need 1 <= crop <= resize, got resize={resize} crop={crop}")
        self.paths = list(paths)
        self.resize = resize
        self.crop = crop
        self.mode = "L" if channels == 1 else "RGB"
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im = resize_center_crop(im.convert(self.mode), self.resize, self.crop)
                pixels = np.asarray(im, dtype=np.uint8)
        except _DECODE_ERRORS as exc:
            raise DataError(f"could not decode image {path}: {exc}; remove or replace it") from exc
        x = torch.from_numpy(pixels.copy()).float()
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        return ((x - self.mean) / self.std).contiguous(), UNLABELED
