"""ImageNet-style train split and its random-resized-crop + flip augmentation, on tiny folders."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.data import imagefolder, imagenet_synsets, load_dataset, make_loader
from lowbit.data.imagefolder import random_resized_crop_box
from lowbit.errors import DataError

TENCH, GOLDFISH = "n01440764", "n01443537"


def _noise(path: Path, size: tuple[int, int], seed: int) -> np.ndarray:
    """Save random RGB noise (lossless for PNG) so every crop position gives different pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _write_split(root: Path, split: str = "train") -> dict[str, np.ndarray]:
    folder = root / split
    return {
        "a": _noise(folder / TENCH / "n01440764_1.png", (40, 30), 1),
        "b": _noise(folder / TENCH / "n01440764_2.JPEG", (30, 44), 2),
        "c": _noise(folder / GOLDFISH / "n01443537_1.png", (32, 32), 3),
    }


def test_train_split_loads_with_crop_shape_and_labels(tmp_path: Path) -> None:
    _write_split(tmp_path)
    ds = load_dataset("imagenette", tmp_path, "train", resize=32, crop=24)
    wnids = imagenet_synsets()
    assert ds.augment and len(ds) == 3
    assert ds.labels.tolist() == [wnids.index(TENCH)] * 2 + [wnids.index(GOLDFISH)]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32
        assert y == ds.labels[i]
    norm = load_dataset("imagenet", tmp_path, "train", mean=(127.5,) * 3, std=(127.5,) * 3)
    assert norm[0][0].shape == (3, 224, 224)
    assert -1.0 <= norm[0][0].min() and norm[0][0].max() <= 1.0


def test_augmentation_follows_torch_seed(tmp_path: Path) -> None:
    _write_split(tmp_path)
    ds = load_dataset("imagenette", tmp_path, "train", resize=32, crop=16)
    torch.manual_seed(0)
    first = ds[0][0]
    torch.manual_seed(0)
    assert torch.equal(first, ds[0][0])
    torch.manual_seed(1)
    assert not torch.equal(first, ds[0][0])


def test_loader_workers_reproduce_augmentation(tmp_path: Path) -> None:
    """Workers reseed from the loader's generator, so a seeded loader repeats its crops."""
    _write_split(tmp_path)
    ds = load_dataset("imagenette", tmp_path, "train", resize=32, crop=16)

    def images(seed: int) -> torch.Tensor:
        return torch.cat([x for x, _ in make_loader(ds, 2, shuffle=True, workers=2, seed=seed)])

    first = images(5)
    assert torch.equal(first, images(5))
    assert not torch.equal(first, images(6))


def test_flip_mirrors_the_crop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = _write_split(tmp_path)["c"]
    expected = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    monkeypatch.setattr(imagefolder, "random_resized_crop_box", lambda w, h: (0, 0, w, h))
    ds = load_dataset("imagenette", tmp_path, "train", resize=32, crop=32)
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        out = ds.load_pixels(2)
        if torch.equal(out, expected):
            seen.add("plain")
        elif torch.equal(out, expected.flip(-1)):
            seen.add("flipped")
        else:
            pytest.fail("output is neither the image nor its mirror")
    assert seen == {"plain", "flipped"}


def test_crop_box_ranges_and_fallback() -> None:
    torch.manual_seed(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(120, 90)
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 90
        assert 0.08 * 0.9 <= w * h / (120 * 90) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # every sampled box is taller than 10 px, so all tries miss and the centred box is used
    assert random_resized_crop_box(1000, 10) == ((1000 - 13) // 2, 0, 13, 10)
    assert random_resized_crop_box(10, 1000) == (0, (1000 - 13) // 2, 10, 13)


def test_augment_switch_and_val_unchanged(tmp_path: Path) -> None:
    _write_split(tmp_path)
    _write_split(tmp_path, "val")
    plain = load_dataset("imagenette", tmp_path, "train", resize=32, crop=24, augment=False)
    val = load_dataset("imagenette", tmp_path, "val", resize=32, crop=24)
    test = load_dataset("imagenette", tmp_path, "test", resize=32, crop=24)
    assert not plain.augment and not val.augment and not test.augment
    torch.manual_seed(0)
    a = plain[1][0]
    torch.manual_seed(1)
    assert torch.equal(a, plain[1][0]) and torch.equal(a, val[1][0])
    assert torch.equal(val[1][0], test[1][0])
    assert load_dataset("imagenette", tmp_path, "val", resize=32, crop=24, augment=True).augment


def test_missing_train_folder_names_expected_path(tmp_path: Path) -> None:
    _write_split(tmp_path, "val")
    for name, hint in (("imagenet", "ILSVRC2012_img_train.tar"), ("imagenette", "imagenette")):
        with pytest.raises(DataError) as err:
            load_dataset(name, tmp_path, "train")
        msg = str(err.value)
        assert str(tmp_path / "train") in msg and "train/n01440764/" in msg and hint in msg
    (tmp_path / "train" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train")) + ".*not ImageNet"):
        load_dataset("imagenette", tmp_path, "train")
