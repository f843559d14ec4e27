"""Dataset loaders, preprocessing and seeded splits, on synthetic files written to tmp_path."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.data import (
    calib_eval_split,
    imagenet_class_names,
    imagenet_synsets,
    list_datasets,
    load_dataset,
    make_loader,
    subset,
)
from lowbit.errors import DataError

TENCH, TOILET_TISSUE, PARACHUTE = "n01440764", "n15075141", "n03888257"


# ---------------------------------------------------------------- helpers


def _cifar_image(seed: int) -> np.ndarray:
    """A [3072] uint8 row in R, G, B plane order with a few known pixels."""
    row = np.random.default_rng(seed).integers(0, 256, 3072, dtype=np.uint8)
    row[0], row[1024], row[2048] = 255, 0, 128  # pixel (0, 0): R, G, B
    row[1 * 32 + 2], row[1024 + 34], row[2048 + 34] = 10, 20, 30  # pixel (row 1, col 2)
    return row


def _write_batch(
    path: Path, rows: list[np.ndarray], labels: list[int], key: str = "labels"
) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": np.stack(rows), key: labels, "batch_label": path.name}, f, protocol=2)


def _write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        _write_batch(
            folder / f"data_batch_{b}", [_cifar_image(10 * b), _cifar_image(10 * b + 1)], [b, 9]
        )
    _write_batch(
        folder / "test_batch", [_cifar_image(0), _cifar_image(1), _cifar_image(2)], [3, 0, 7]
    )
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072}, f)
    return folder


def _write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, quality=95)


def _write_imagenet(root: Path) -> Path:
    val = root / "val"
    _write_image(val / TENCH / "ILSVRC2012_val_00000001.JPEG", (40, 30), (200, 100, 50))
    _write_image(val / TENCH / "ILSVRC2012_val_00000002.JPEG", (30, 45), (10, 20, 30))
    _write_image(val / TOILET_TISSUE / "ILSVRC2012_val_00000003.JPEG", (64, 64), (255, 255, 255))
    return val


# ---------------------------------------------------------------- digits


def test_digits_shapes_labels_and_fixed_split() -> None:
    train = load_dataset("digits", split="train", mean=(8.0,), std=(4.0,))
    test = load_dataset("digits", split="test", mean=(8.0,), std=(4.0,))
    assert (len(train), len(test)) == (1437, 360)
    x, y = test[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert x.min() >= (0 - 8) / 4 and x.max() <= (16 - 8) / 4
    assert set(test.labels.tolist()) == set(range(10))
    assert torch.bincount(test.labels, minlength=10).min() >= 35  # stratified: ~36 per class
    again = load_dataset("digits", split="test", mean=(8.0,), std=(4.0,))
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    raw = load_dataset("digits", split="test")
    assert torch.equal(raw[0][0], test.images[0].float())


# ---------------------------------------------------------------- CIFAR


def test_cifar10_pixel_order_normalisation_and_labels(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path, split="test", mean=(100, 50, 25), std=(2, 4, 5))
    assert len(ds) == 3 and [ds[i][1] for i in range(3)] == [3, 0, 7]
    x, _ = ds[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == pytest.approx(
        [77.5, -12.5, 20.6]
    )  # (255-100)/2, (0-50)/4, (128-25)/5
    assert x[:, 1, 2].tolist() == pytest.approx(
        [-45.0, -7.5, 1.0]
    )  # (10-100)/2, (20-50)/4, (30-25)/5
    raw = torch.from_numpy(_cifar_image(2).reshape(3, 32, 32)).float()
    assert torch.allclose(
        ds[2][0],
        (raw - torch.tensor([100.0, 50, 25]).view(3, 1, 1))
        / torch.tensor([2.0, 4, 5]).view(3, 1, 1),
    )
    assert ds.classes[3] == "cat"

    xb, yb = ds.batch([1, 2], channels_last=True)
    assert torch.allclose(xb[0], x) and yb.tolist() == [0, 7]
    assert xb.is_contiguous(memory_format=torch.channels_last)


def test_cifar10_train_concatenates_batches_and_accepts_folder_itself(tmp_path: Path) -> None:
    folder = _write_cifar10(tmp_path)
    train = load_dataset("cifar10", root=folder, split="train")
    assert len(train) == 10
    assert train.labels.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
    assert train[2][0][:, 0, 0].tolist() == [255.0, 0.0, 128.0]


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write_batch(folder / "train", [_cifar_image(5)], [42], key="fine_labels")
    _write_batch(folder / "test", [_cifar_image(6), _cifar_image(7)], [99, 0], key="fine_labels")
    ds = load_dataset("cifar100", root=tmp_path, split="test")
    assert len(ds) == 2 and [ds[i][1] for i in range(2)] == [99, 0]
    assert load_dataset("cifar100", root=tmp_path, split="train")[0][1] == 42


# ---------------------------------------------------------------- ImageNet-style folders


def test_shipped_synset_list() -> None:
    wnids = imagenet_synsets()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[0] == TENCH and wnids[701] == PARACHUTE and wnids[999] == TOILET_TISSUE
    names = imagenet_class_names()
    assert len(names) == 1000 and all(names)
    assert names[0].startswith("tench") and names[701].startswith("parachute")


def test_imagefolder_labels_sizes_and_values(tmp_path: Path) -> None:
    _write_imagenet(tmp_path)
    ds = load_dataset("imagenette", root=tmp_path, split="val", resize=32, crop=24)
    wnids = imagenet_synsets()
    assert len(ds) == 3
    assert [label for _, label in ds.samples] == [wnids.index(TENCH)] * 2 + [
        wnids.index(TOILET_TISSUE)
    ]
    assert [p.name for p, _ in ds.samples] == [f"ILSVRC2012_val_0000000{i}.JPEG" for i in (1, 2, 3)]
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == ds.samples[i][1]
    assert torch.allclose(ds[0][0].mean(dim=(1, 2)), torch.tensor([200.0, 100.0, 50.0]), atol=3)

    norm = load_dataset("imagenet", root=tmp_path / "val", mean=(127.5,) * 3, std=(127.5,) * 3)
    x, y = norm[2]
    assert x.shape == (3, 224, 224) and y == 999
    assert torch.allclose(x, torch.ones_like(x), atol=0.02)  # white: (255 - 127.5) / 127.5


def test_imagefolder_center_crop_geometry(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(40, dtype=np.uint8) * 5, (20, 1))  # 20 rows x 40 cols, value = 5 * col
    path = tmp_path / "val" / PARACHUTE / "ramp.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(path)
    ds = load_dataset("imagenet", root=tmp_path, resize=20, crop=10)
    x, y = ds[0]
    assert y == 701 and x.shape == (3, 10, 10)
    assert x[0, 0].tolist() == [5.0 * c for c in range(15, 25)]  # left offset (40 - 10) / 2 = 15


# ---------------------------------------------------------------- splits and loaders


def test_calib_eval_split_is_disjoint_complete_and_seeded() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(100))
    calib, evaluation = calib_eval_split(data, 30, seed=0)
    assert len(calib) == 30 and len(evaluation) == 70
    assert set(calib.indices).isdisjoint(evaluation.indices)
    assert set(calib.indices) | set(evaluation.indices) == set(range(100))
    calib2, eval2 = calib_eval_split(data, 30, seed=0)
    assert calib2.indices == calib.indices and eval2.indices == evaluation.indices
    assert calib_eval_split(data, 30, seed=1)[0].indices != calib.indices
    assert calib.indices != sorted(calib.indices)  # shuffled: calibration batches mix classes
    assert int(calib[0][0]) == calib.indices[0]


def test_subset_and_loader_are_seeded() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(50), torch.arange(50) % 3)
    assert subset(data, 10, seed=3).indices == subset(data, 10, seed=3).indices
    assert subset(data, 10, seed=3).indices != subset(data, 10, seed=4).indices
    assert len(subset(data, 50)) == 50

    def order(seed: int) -> list[int]:
        return torch.cat([x for x, _ in make_loader(data, 8, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == list(range(50))
    plain = torch.cat([x for x, _ in make_loader(data, 16)]).tolist()
    assert plain == list(range(50))


def test_split_of_real_dataset_feeds_a_loader() -> None:
    ds = load_dataset("digits", split="test")
    calib, evaluation = calib_eval_split(ds, 64, seed=0)
    x, y = next(iter(make_loader(calib, 32)))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    assert len(evaluation) == len(ds) - 64


# ---------------------------------------------------------------- bad input


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*cifar10.*digits.*imagenette"):
        load_dataset("mnist")
    assert list_datasets() == ["cifar10", "cifar100", "digits", "imagenet", "imagenette", "images"]


def test_missing_paths_say_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", root=tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg and "--data-root" in msg
    with pytest.raises(DataError, match="cifar-100-python.tar.gz"):
        load_dataset("cifar100", root=tmp_path)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "none" / "val"))):
        load_dataset("imagenet", root=tmp_path / "none")


def test_wrong_layouts_name_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"")
    with pytest.raises(DataError, match="expected file.*data_batch_1.*missing"):
        load_dataset("cifar10", root=tmp_path, split="train")

    (tmp_path / "val" / "cats").mkdir(parents=True)
    (tmp_path / "val" / "dogs").mkdir()
    with pytest.raises(DataError, match="not ImageNet-1k synsets: cats, dogs"):
        load_dataset("imagenette", root=tmp_path)

    empty = tmp_path / "empty" / "val" / TENCH
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        load_dataset("imagenette", root=tmp_path / "empty")

    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset("imagenet", root=tmp_path / "cifar-10-batches-py")


def test_corrupt_pickles(tmp_path: Path) -> None:
    folder = _write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x04garbage that is not a pickle")
    with pytest.raises(DataError, match="test_batch.*corrupt"):
        load_dataset("cifar10", root=tmp_path)

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"expected uint8 \[N, 3072\]"):
        load_dataset("cifar10", root=tmp_path)

    class Sneaky:
        def __reduce__(self) -> tuple:
            return (print, ("should never run",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Sneaky()}, f)
    with pytest.raises(DataError, match="unexpected object builtins.print"):
        load_dataset("cifar10", root=tmp_path)


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    val = _write_imagenet(tmp_path)
    bad = val / TOILET_TISSUE / "ILSVRC2012_val_00000004.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    ds = load_dataset("imagenet", root=tmp_path)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        ds[3]
    with pytest.raises(DataError, match="could not decode"):
        list(make_loader(ds, 4))


def test_bad_arguments() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(10))
    for size in (0, -1, 10, 11):
        with pytest.raises(DataError, match="calib_size must be between 1 and 9"):
            calib_eval_split(data, size)
    with pytest.raises(DataError, match="subset size"):
        subset(data, 11)
    with pytest.raises(DataError, match="batch_size"):
        make_loader(data, 0)
    with pytest.raises(DataError, match="splits 'train' and 'test', not 'val'"):
        load_dataset("digits", split="val")
    with pytest.raises(DataError, match="one value per channel"):
        load_dataset("digits", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="std positive"):
        load_dataset("digits", mean=(0.0,), std=(0.0,))
    with pytest.raises(DataError, match="crop <= resize"):
        load_dataset("imagenet", root="/nonexistent", resize=200, crop=224)
    with pytest.raises(DataError, match="split"):
        load_dataset("imagenet", split="train")
