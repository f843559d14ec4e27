"""Batch augmentation used by the QAT trainer: every output is a crop/flip of its own input."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.qat import TrainConfig
from lowbit.qat.augment import augment_batch


def _candidates(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    h, w = img.shape[-2:]
    padded = F.pad(img, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_flip_only_flips_and_keeps_layout():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 6, 6)
    y = augment_batch(x, "flip")
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(y[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54  # about half
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_crop_flip_outputs_are_crops_of_their_own_padded_input():
    torch.manual_seed(1)
    x = torch.randn(16, 2, 5, 7)
    y = augment_batch(x, "crop-flip", pad=2)
    assert y.shape == x.shape
    for i in range(16):
        assert any(torch.equal(y[i], c) for c in _candidates(x[i], 2))
    # not the identity for the whole batch
    assert not torch.equal(y, x)


def test_augmentation_follows_torch_seed_and_none_is_identity():
    x = torch.randn(8, 3, 8, 8)
    torch.manual_seed(3)
    a = augment_batch(x, "crop-flip")
    torch.manual_seed(3)
    b = augment_batch(x, "crop-flip")
    assert torch.equal(a, b)
    assert augment_batch(x, "none") is x


def test_train_config_rejects_unknown_augmentation():
    assert TrainConfig(augment="crop-flip").augment == "crop-flip"
    with pytest.raises(ValueError):
        TrainConfig(augment="mixup")
