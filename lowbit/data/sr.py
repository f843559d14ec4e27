"""Super-resolution data: pairs of a bicubic low-resolution image and its high-resolution original.

Any folder of photos serves as HR images. The LR input is the HR image (cropped to a multiple of
the scale) downscaled by PIL's bicubic filter, as the EDSR protocol makes its LR sets; training
takes random HR patches with their LR counterparts and the standard flips and 90-degree
rotations. Every image is RGB: grayscale and palette images are converted (their three channels
are equal) and counted in a warning; images with an alpha channel are refused, since what lies
under transparent pixels is not defined.

Items are ``(lr, hr)`` float32 tensors ``[3, h, w]`` and ``[3, scale*h, scale*w]``, both
normalised as ``(pixel - mean) / std`` with the model's statistics in pixel units (0..255).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from lowbit.errors import DataError, LowbitWarning

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def scan_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted so the order is reproducible."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}; pass a folder of PNG/JPEG images "
                        "with --data-root")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); pass "
                        "a folder of high-resolution photos")
    return paths


def _header(path: Path) -> tuple[tuple[int, int], bool]:
    """``((width, height), converted)`` from the file header; refuses alpha and unreadable files."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
            transparent = mode == "P" and "transparency" in im.info
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as an image ({exc}); remove or replace it") from None
    if mode in _ALPHA_MODES or transparent:
        raise DataError(
            f"{path} has an alpha channel (mode {mode}): super-resolution reads RGB only; flatten "
            "it onto a background (e.g. PIL: Image.alpha_composite) or remove it"
        )
    return size, mode != "RGB"


def read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


def crop_to_scale(image: Image.Image, scale: int) -> Image.Image:
    """Drop the right/bottom rows and columns so both sides are multiples of ``scale``."""
    w, h = image.size
    return image.crop((0, 0, w - w % scale, h - h % scale))


def bicubic_down(image: Image.Image, scale: int) -> Image.Image:
    """The LR image of an HR image whose sides are multiples of ``scale``."""
    w, h = image.size
    return image.resize((w // scale, h // scale), Image.BICUBIC)


def image_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    arr = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = arr.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float()
    return (pixels - mean) / std


def augment_pair(lr: torch.Tensor, hr: torch.Tensor, code: int) -> tuple[torch.Tensor, ...]:
    """One of the 8 flips/rotations (``code`` 0..7: bit 0 horizontal flip, bit 1 vertical flip,
    bit 2 transpose), applied identically to both images."""
    out = []
    for t in (lr, hr):
        if code & 1:
            t = t.flip(-1)
        if code & 2:
            t = t.flip(-2)
        if code & 4:
            t = t.transpose(-1, -2)
        out.append(t.contiguous())
    return tuple(out)


class SRDataset(Dataset):
    """``(lr, hr)`` pairs from HR image files.

    ``patch`` None: whole images, cropped to a multiple of ``scale`` (evaluation; batch size 1,
    since sizes differ). ``patch`` N: one random N x N HR patch per item (N a multiple of
    ``scale``), with its LR patch cut from the LR image of the whole photo; ``augment`` adds a
    random flip/rotation. Patches are drawn from torch's global generator, which the trainer
    re-seeds every epoch; ``seed`` instead fixes each item's patch (calibration sets).
    """

    def __init__(self, paths: Sequence[str | Path], scale: int, mean: Sequence[float] = (0, 0, 0),
                 std: Sequence[float] = (1, 1, 1), *, patch: int | None = None,
                 augment: bool = False, seed: int | None = None):
        if scale < 1:
            raise DataError(f"scale must be >= 1, got {scale}")
        if patch is not None and (patch < scale or patch % scale):
            raise DataError(f"the HR patch ({patch}) must be a positive multiple of the scale "
                            f"({scale}): e.g. --patch {max(scale, patch - patch % scale)}")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataError("no images given for the super-resolution dataset")
        self.scale, self.patch, self.augment, self.seed = scale, patch, augment, seed
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)
        need = patch or scale
        converted = 0
        for p in self.paths:
            (w, h), conv = _header(p)
            converted += conv
            if min(w, h) < need:
                what = f"the {patch} px training patch" if patch else f"the scale {scale}"
                raise DataError(f"{p} is {w}x{h}, smaller than {what}: remove it or use a "
                                "smaller --patch")
        if converted:
            warnings.warn(f"{converted} of {len(self.paths)} images are grayscale or palette "
                          "images: converted to RGB (equal channels)", LowbitWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        hr_img = crop_to_scale(read_rgb(self.paths[index]), self.scale)
        lr = image_tensor(bicubic_down(hr_img, self.scale), self.mean, self.std)
        hr = image_tensor(hr_img, self.mean, self.std)
        if self.patch is None:
            return lr, hr
        gen = (torch.Generator().manual_seed(self.seed * 1_000_003 + index)
               if self.seed is not None else None)
        lp = self.patch // self.scale
        top = int(torch.randint(lr.shape[1] - lp + 1, (1,), generator=gen))
        left = int(torch.randint(lr.shape[2] - lp + 1, (1,), generator=gen))
        code = int(torch.randint(8, (1,), generator=gen)) if self.augment else 0
        s = self.scale
        lr = lr[:, top:top + lp, left:left + lp]
        hr = hr[:, top * s:(top + lp) * s, left * s:(left + lp) * s]
        return augment_pair(lr, hr, code)


# Imagenette photos held out from training, the same ones whatever the run's seed
IMAGENETTE_TEST_IMAGES = 50
_HOLDOUT_SEED = 0


def _imagenette_paths(root: Path, split: str) -> list[Path]:
    folder = root / "val" if (root / "val").is_dir() else root
    paths = scan_images(folder)
    if len(paths) <= IMAGENETTE_TEST_IMAGES:
        raise DataError(f"{folder} has {len(paths)} images; sr-imagenette holds out "
                        f"{IMAGENETTE_TEST_IMAGES} for testing and trains on the rest")
    perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(_HOLDOUT_SEED))
    take = perm[:IMAGENETTE_TEST_IMAGES] if split == "test" else perm[IMAGENETTE_TEST_IMAGES:]
    return [paths[i] for i in sorted(take.tolist())]


def _sklearn_paths(root: Path | None, split: str) -> list[Path]:
    if split != "test":
        raise DataError("sr-sklearn has only a test split (2 images): calibrate or train on "
                        "another dataset, e.g. --calib-dataset sr-imagenette")
    try:
        import sklearn.datasets
    except ImportError:
        raise DataError("sr-sklearn reads the photos bundled with scikit-learn, which is not "
                        "installed: pip install scikit-learn, or use -d sr-folder --data-root DIR"
                        ) from None
    folder = Path(sklearn.datasets.__file__).parent / "images"
    return [folder / "china.jpg", folder / "flower.jpg"]


def sklearn_photos() -> list[Path]:
    """scikit-learn's bundled photos (china.jpg, flower.jpg): the test images of sr-sklearn."""
    return _sklearn_paths(None, "test")


def _folder_paths(root: Path | None, split: str) -> list[Path]:
    if root is None:
        raise DataError("sr-folder needs the image folder: pass --data-root DIR")
    return scan_images(root)


# name -> (default folder under the data root or None, path lister, description)
SR_DATASETS = {
    "sr-imagenette": ("imagenette", _imagenette_paths,
                      f"Imagenette photos (224 px JPEG); {IMAGENETTE_TEST_IMAGES} seeded held-out "
                      "images for test, the rest for training/calibration"),
    "sr-sklearn": (None, _sklearn_paths,
                   "scikit-learn's bundled photos china.jpg and flower.jpg (427x640 JPEG)"),
    "sr-folder": (None, _folder_paths, "every image under --data-root (same images for any split)"),
}


def list_sr_datasets() -> list[str]:
    return sorted(SR_DATASETS)


def sr_image_paths(name: str, root: str | Path | None, split: str) -> tuple[list[Path], Path | None]:
    """The HR image files of split ``train`` or ``test`` of SR dataset ``name``, and the
    folder they were read from."""
    from lowbit.data.registry import DEFAULT_ROOT

    if name not in SR_DATASETS:
        raise DataError(f"unknown super-resolution dataset {name!r}; available: "
                        f"{', '.join(list_sr_datasets())}")
    if split not in ("train", "test"):
        raise DataError(f"{name} has splits 'train' and 'test', not {split!r}")
    default, lister, _ = SR_DATASETS[name]
    base = Path(root).expanduser() if root is not None else (
        DEFAULT_ROOT.expanduser() / default if default else None)
    paths = lister(base, split)
    return paths, (paths[0].parent if base is None else base)
