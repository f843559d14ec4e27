"""ImageNet-style ``val/<synset>/<image>`` folders with the usual resize + centre-crop protocol.

Labels are positions in the full sorted ImageNet-1k synset list, so a 1000-class model is scored
over all its outputs even on a 10-class subset such as Imagenette.
"""

from __future__ import annotations

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


class ImageFolderDataset(Dataset):
    """Decodes one image per access: an ImageNet split does not fit in memory as float."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        mean: Sequence[float],
        std: Sequence[float],
        resize: int = 256,
        crop: int = 224,
    ) -> None:
        self.samples = list(samples)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.classes = list(imagenet_class_names())
        self.resize = resize
        self.crop = crop
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def load_pixels(self, index: int) -> torch.Tensor:
        """The resized, cropped image as uint8 [3, crop, crop], before normalisation."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                im = resize_center_crop(im.convert("RGB"), self.resize, self.crop)
                pixels = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"could not decode image {path}: {exc}") from exc
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = (self.load_pixels(index).float() - self.mean) / self.std
        return x.contiguous(), self.samples[index][1]
