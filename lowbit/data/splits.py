"""Seeded calibration/evaluation splits and loaders, so every run sees the same images."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lowbit.errors import DataError


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def calib_eval_split(dataset: Dataset, calib_size: int, seed: int = 0) -> tuple[Subset, Subset]:
    """Split into disjoint calibration and evaluation subsets covering the whole dataset.

    Calibration keeps the shuffled order (mixed classes in every batch, even for folder datasets
    sorted by class); evaluation indices are sorted, since order does not change accuracy and
    sequential reads are faster.
    """
    n = len(dataset)
    if not 1 <= calib_size < n:
        raise DataError(
            f"calib_size must be between 1 and {n - 1} for a dataset of {n} items "
            f"(some must remain for evaluation), got {calib_size}"
        )
    perm = _permutation(n, seed)
    calib = perm[:calib_size].tolist()
    evaluation = sorted(perm[calib_size:].tolist())
    return Subset(dataset, calib), Subset(dataset, evaluation)


def subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """A fixed random ``n`` items, e.g. to shorten an evaluation reproducibly."""
    total = len(dataset)
    if not 1 <= n <= total:
        raise DataError(f"subset size must be between 1 and {total}, got {n}")
    return Subset(dataset, _permutation(total, seed)[:n].tolist())


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0, seed: int = 0
) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed``."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise DataError(f"workers must be 0 or more, got {workers}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        persistent_workers=False,
    )
