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

from PIL import Image

from lowbit.data.imagefolder import DECODE_ERRORS, IMAGE_SUFFIXES, ImageFolderDataset
from lowbit.errors import DataError

UNLABELED = -1  # the target of an image without a label (never a class index)


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
        except DECODE_ERRORS as exc:
            bad.append(f"{path} ({exc})")
    if bad:
        raise DataError(
            f"{len(bad)} of {len(paths)} files in {folder} are not readable images, e.g. "
            f"{bad[0]}: remove or replace them"
        )
    return paths


class UnlabeledImageFolder(ImageFolderDataset):
    """``(float32 [C, crop, crop], UNLABELED)`` per image, decoded on access with the
    evaluation transform (resize + centre crop) of :class:`ImageFolderDataset`."""

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
        super().__init__([(p, UNLABELED) for p in paths], mean, std, resize=resize, crop=crop,
                         channels=channels)
        self.classes = []

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]
