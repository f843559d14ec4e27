"""Dataset names the CLI and benchmarks accept, and the checks that turn bad paths into advice."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from torch.utils.data import Dataset

from lowbit.data.cifar import (
    CIFAR10_DIR,
    CIFAR10_FILES,
    CIFAR100_DIR,
    CIFAR100_FILES,
    InMemoryImageDataset,
    read_cifar,
)
from lowbit.data.imagefolder import ImageFolderDataset, scan_synset_folder
from lowbit.data.unlabeled import UnlabeledImageFolder, scan_images
from lowbit.errors import DataError

DEFAULT_ROOT = Path("~/.cache/lowbit-data")
PathLike = str | os.PathLike

_CIFAR_URLS = {
    CIFAR10_DIR: "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    CIFAR100_DIR: "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def _norm_stats(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
) -> tuple[list[float], list[float]]:
    """Check per-channel pixel-unit statistics; None means raw pixels (mean 0, std 1)."""
    mean_l = [0.0] * channels if mean is None else [float(m) for m in mean]
    std_l = [1.0] * channels if std is None else [float(s) for s in std]
    if len(mean_l) != channels or len(std_l) != channels:
        raise DataError(
            f"mean and std need one value per channel ({channels}), got {len(mean_l)} and {len(std_l)}"
        )
    if not all(math.isfinite(m) for m in mean_l) or not all(
        math.isfinite(s) and s > 0 for s in std_l
    ):
        raise DataError(f"mean must be finite and std positive, got mean={mean_l} std={std_l}")
    return mean_l, std_l


def _check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise DataError(f"{name} has split(s) {', '.join(map(repr, allowed))}, not {split!r}")


def _cifar_folder(root: Path, subdir: str, label: str, files: dict[str, list[str]]) -> Path:
    """Accept either the archive's parent or the extracted folder itself."""
    wanted = root / subdir
    if wanted.is_dir():
        return wanted
    known = {f for names in files.values() for f in names}
    if root.is_dir() and (root.name == subdir or any((root / f).exists() for f in known)):
        return root
    raise DataError(
        f"{label} not found: looked for {wanted}. Download the python version "
        f"({_CIFAR_URLS[subdir]}) and extract it so that {wanted}/ holds "
        f"{', '.join(files['train'] + files['test'])}; then pass the folder containing "
        f"{subdir}/ with --data-root (default {DEFAULT_ROOT})."
    )


def _load_cifar(
    name: str, root: Path, split: str, mean: list[float], std: list[float], hundred: bool, **_
) -> InMemoryImageDataset:
    files = CIFAR100_FILES if hundred else CIFAR10_FILES
    _check_split(name, split, tuple(files))
    subdir = CIFAR100_DIR if hundred else CIFAR10_DIR
    label = "CIFAR-100" if hundred else "CIFAR-10"
    folder = _cifar_folder(root, subdir, label, files)
    missing = [f for f in files[split] if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{folder} does not look like an extracted {label} python-version archive: "
            f"expected file(s) {', '.join(files[split])} for split {split!r}, missing "
            f"{', '.join(missing)}"
        )
    images, labels, classes = read_cifar(folder, split, hundred=hundred)
    return InMemoryImageDataset(images, labels, mean, std, classes=classes)


_IMAGENET_HINTS = {
    "ImageNet": "ImageNet must be obtained from https://image-net.org; sort the 50,000 validation "
    "images into one folder per synset.",
    "Imagenette": "Imagenette's archive (https://github.com/fastai/imagenette) already has this "
    "layout.",
}


_IMAGENET_TRAIN_HINTS = {
    "ImageNet": "ImageNet must be obtained from https://image-net.org; ILSVRC2012_img_train.tar "
    "holds one tar per synset: extract each into train/<synset>/.",
    "Imagenette": "Imagenette's archive (https://github.com/fastai/imagenette) already has "
    "train/ beside val/.",
}


def _imagenet_train_folder(root: Path, label: str) -> Path:
    """Training images must sit in ``root/train``: unlike val, ``root`` itself is never taken as
    the train folder, so a val-only folder cannot be silently trained on."""
    folder = root / "train"
    if folder.is_dir():
        return folder
    raise DataError(
        f"{label} training split not found: looked for {folder} holding <synset>/<image>.JPEG, "
        f"e.g. train/n01440764/n01440764_10026.JPEG, next to val/. "
        f"{_IMAGENET_TRAIN_HINTS[label]} Pass the folder holding train/ with --data-root."
    )


def _imagenet_folder(root: Path, label: str) -> tuple[Path, bool]:
    """Return the val folder and whether it was found as ``root/val`` (for error messages)."""
    if (root / "val").is_dir():
        return root / "val", True
    if root.is_dir():
        return root, False
    raise DataError(
        f"{label} not found: looked for {root / 'val'} (or {root} itself as the val folder) "
        f"holding <synset>/<image>.JPEG, e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG. "
        f"{_IMAGENET_HINTS[label]} Pass the folder with --data-root."
    )


def _load_imagefolder(
    name: str,
    label: str,
    root: Path,
    split: str,
    mean: list[float],
    std: list[float],
    resize: int | None,
    crop: int,
    augment: bool,
) -> ImageFolderDataset:
    _check_split(name, split, ("train", "val", "test"))
    resize = 256 if resize is None else resize
    if resize < 1 or crop < 1 or crop > resize:
        raise DataError(f"need 1 <= crop <= resize, got resize={resize} crop={crop}")
    if split == "train":
        samples = scan_synset_folder(_imagenet_train_folder(root, label))
        return ImageFolderDataset(samples, mean, std, resize=resize, crop=crop, augment=augment)
    folder, nested = _imagenet_folder(root, label)
    try:
        samples = scan_synset_folder(folder)
    except DataError as exc:
        if nested:
            raise
        raise DataError(
            f"{root} has no val/ subfolder and is not a val folder itself: {exc}"
        ) from exc
    return ImageFolderDataset(samples, mean, std, resize=resize, crop=crop, augment=augment)


def _digits(root: Path, split: str, mean: list[float], std: list[float], **_) -> InMemoryImageDataset:
    from lowbit.data.digits import load_digits_dataset

    return load_digits_dataset(split, mean, std)


def _load_unlabeled(
    root: Path, split: str, mean: list[float], std: list[float], resize: int | None, crop: int,
    **_,
) -> UnlabeledImageFolder:
    """Every image under ``root`` whatever the split (the folder is one pool of images)."""
    return UnlabeledImageFolder(scan_images(root), mean, std, resize=resize or crop, crop=crop,
                                channels=len(mean))


# called with keywords root, split, mean, std, resize, crop, augment (each takes what it needs)
Loader = Callable[..., Dataset]

# name -> (channels, default folder under DEFAULT_ROOT, loader); channels None: any (converted)
_LOADERS: dict[str, tuple[int | None, str, Loader]] = {
    "digits": (1, "", _digits),
    "cifar10": (3, "", partial(_load_cifar, "cifar10", hundred=False)),
    "cifar100": (3, "", partial(_load_cifar, "cifar100", hundred=True)),
    "imagenet": (3, "imagenet", partial(_load_imagefolder, "imagenet", "ImageNet")),
    "imagenette": (3, "imagenette", partial(_load_imagefolder, "imagenette", "Imagenette")),
    "images": (None, "images", _load_unlabeled),
}

# datasets whose items carry no label (their targets are lowbit.data.unlabeled.UNLABELED)
_UNLABELED = {"images"}


# side of the (square) images of the fixed-size datasets; the others are resized and cropped to
# whatever the model takes
_IMAGE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32}


def image_shape(name: str) -> tuple[int | None, int | None]:
    """``(channels, side)`` of the images dataset ``name`` yields (None: any, by converting or
    resizing)."""
    key = name.lower()
    if key not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _LOADERS[key][0], _IMAGE_SIZE.get(key)


def dataset_root(name: str, root: PathLike | None = None) -> Path:
    """The folder dataset ``name`` is read from: ``root`` as given, else its default under
    ``~/.cache/lowbit-data`` (``.../imagenet`` or ``.../imagenette`` for those)."""
    key = name.lower()
    if key not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    if root is not None:
        return Path(root).expanduser()
    default_sub = _LOADERS[key][1]
    return (DEFAULT_ROOT / default_sub if default_sub else DEFAULT_ROOT).expanduser()


def is_labeled(name: str) -> bool:
    """Whether dataset ``name`` has labels (an ``images`` folder has none: it can train by
    distillation and calibrate, not evaluate or train on cross-entropy)."""
    image_shape(name)
    return name.lower() not in _UNLABELED


def list_datasets() -> list[str]:
    """Names ``load_dataset`` accepts."""
    return sorted(_LOADERS)


def load_dataset(
    name: str,
    root: PathLike | None = None,
    split: str = "test",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: int | None = None,
    crop: int = 224,
    augment: bool | None = None,
) -> Dataset:
    """Load a dataset yielding ``(float32 [C, H, W], int label)`` normalised as ``(p - mean) / std``.

    ``mean``/``std`` are per channel in pixel units (0..255; 0..16 for digits); None leaves raw
    pixel values. ``root`` defaults to ``~/.cache/lowbit-data`` (``.../imagenet`` or
    ``.../imagenette`` for those). ImageNet-style data reads ``root/train`` and ``root/val``;
    its test labels are not public, so ``"test"`` means ``"val"`` there. ``resize`` (the short
    side before the centre ``crop``; default 256) and ``augment`` apply to ImageNet-style data:
    ``augment`` (default: on for ``"train"``) swaps resize + centre crop for random-resized crop
    + horizontal flip. ``images`` is any folder of images at ``root`` (nested or flat, every
    split is the whole folder), resized (default: to ``crop``) and centre-cropped, unlabeled.
    """
    key = name.lower()
    if key not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    channels, _, loader = _LOADERS[key]
    base = dataset_root(key, root)
    if channels is None:
        channels = len(mean) if mean is not None else 3
    mean_l, std_l = _norm_stats(mean, std, channels)
    if augment is None:
        augment = split == "train"
    return loader(root=base, split=split, mean=mean_l, std=std_l, resize=resize,
                  crop=crop, augment=augment)
