"""Datasets, preprocessing and seeded calibration/evaluation splits.

Every loader yields ``(float32 [C, H, W], int label)`` normalised as ``(pixel - mean) / std`` with
the model's per-channel statistics in pixel units; an ``images`` folder has no labels (every
target is ``UNLABELED``).
"""

from lowbit.data.imagefolder import imagenet_class_names, imagenet_synsets
from lowbit.data.registry import image_shape, is_labeled, list_datasets, load_dataset
from lowbit.data.splits import calib_eval_split, make_loader, subset
from lowbit.data.unlabeled import UNLABELED, UnlabeledImageFolder

__all__ = [
    "UNLABELED",
    "UnlabeledImageFolder",
    "calib_eval_split",
    "image_shape",
    "imagenet_class_names",
    "imagenet_synsets",
    "is_labeled",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "subset",
]
