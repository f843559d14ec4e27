"""scikit-learn's bundled 8x8 digits: a dataset every install has, for tests and quick demos."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lowbit.data.cifar import InMemoryImageDataset
from lowbit.errors import DataError

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits_dataset(
    split: str, mean: Sequence[float], std: Sequence[float]
) -> InMemoryImageDataset:
    """Return the fixed stratified 80/20 train/test split as uint8 [N, 1, 8, 8], pixels 0..16.

    sklearn is imported here so that ``import lowbit.data`` stays light.
    """
    if split not in ("train", "test"):
        raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    indices = np.arange(len(bunch.target))
    train_idx, test_idx = train_test_split(
        indices, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=bunch.target
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    images = torch.from_numpy(bunch.images[chosen].astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target[chosen].astype(np.int64))
    return InMemoryImageDataset(images, labels, mean, std, classes=[str(i) for i in range(10)])
