"""ImageNet-style ``<split>/<synset>/<image>`` folders with the usual preprocessing.

Evaluation uses resize + centre crop; training uses random-resized crop + horizontal flip drawn
from torch's global RNG, so ``torch.manual_seed`` (and DataLoader worker seeding) reproduces it.

Labels are positions in the full sorted ImageNet-1k synset list, so a 1000-class model is scored
over all its outputs even on a 10-class subset such as Imagenette.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lowbit.errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
# what PIL raises for a file that is not a (complete, safe) image
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_WNID = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def _synset_table() -> tuple[tuple[str, str], ...]:
    text = resources.files("lowbit.data").joinpath("imagenet_synsets.txt").read_text("utf-8")
    return tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip())


def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in standard (sorted) order: index = class id."""
    return tuple(wnid for wnid, _ in _synset_table())


def imagenet_class_names() -> tuple[str, ...]:
    """Human-readable names matching ``imagenet_synsets()`` index for index."""
    return tuple(name for _, name in _synset_table())


@lru_cache(maxsize=1)
def _synset_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(imagenet_synsets())}


def scan_synset_folder(folder: Path) -> list[tuple[Path, int]]:
    """List ``(image path, class index)`` for ``folder/<synset>/<image>``, sorted for determinism."""
    index = _synset_index()
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(
            f"{folder} has no class subfolders; expected ImageNet-style <synset>/<image>.JPEG "
            "folders such as n01440764/"
        )
    unknown = [p.name for p in subdirs if p.name not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        hint = "" if any(_WNID.match(n) for n in unknown) else " (WordNet ids like n01440764)"
        raise DataError(
            f"{folder} has subfolder(s) that are not ImageNet-1k synsets: {shown}; expected "
            f"one folder per synset{hint}"
        )
    samples = [
        (path, index[d.name])
        for d in subdirs
        for path in sorted(d.iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}/<synset>/")
    return samples


def resize_center_crop(image: Image.Image, resize: int, crop: int) -> Image.Image:
    """Resize the short side to ``resize`` (bilinear), then take the central ``crop`` square.

    Matches the common torchvision evaluation transform (truncated long side, rounded offsets).
    """
    w, h = image.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    left = int(round((w - crop) / 2.0))
    top = int(round((h - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Pick ``(left, top, crop width, crop height)`` for the Inception-style training crop.

    Samples an area fraction uniformly in ``scale`` and an aspect ratio log-uniformly in
    ``ratio``; after ``attempts`` misses (a box larger than the image) it falls back to the
    largest centred box whose aspect lies in ``ratio``, as torchvision does.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,)).item())
            top = int(torch.randint(0, height - h + 1, (1,)).item())
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop_flip(image: Image.Image, crop: int) -> Image.Image:
    """The standard ImageNet training augmentation: random-resized crop to ``crop`` px, then a
    horizontal flip with probability 1/2."""
    left, top, w, h = random_resized_crop_box(*image.size)
    image = image.resize((crop, crop), Image.BILINEAR, box=(left, top, left + w, top + h))
    if torch.rand(1).item() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


class ImageFolderDataset(Dataset):
    """Decodes one image per access: an ImageNet split does not fit in memory as float.

    ``augment`` switches from the deterministic evaluation transform to the random training one;
    ``channels`` 1 reads the images as greyscale.
    """

    labeled = True

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        mean: Sequence[float],
        std: Sequence[float],
        resize: int = 256,
        crop: int = 224,
        augment: bool = False,
        channels: int = 3,
    ) -> None:
        self.samples = list(samples)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.classes = list(imagenet_class_names())
        self.resize = resize
        self.crop = crop
        self.augment = augment
        self.mode = "L" if channels == 1 else "RGB"
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def load_pixels(self, index: int) -> torch.Tensor:
        """The transformed image as uint8 [C, crop, crop], before normalisation."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
                if self.augment:
                    im = random_resized_crop_flip(im, self.crop)
                else:
                    im = resize_center_crop(im, self.resize, self.crop)
                pixels = np.asarray(im, dtype=np.uint8)
        except DECODE_ERRORS as exc:
            raise DataError(f"could not decode image {path}: {exc}") from exc
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = (self.load_pixels(index).float() - self.mean) / self.std
        return x.contiguous(), self.samples[index][1]
