"""Datasets, preprocessing and seeded calibration/evaluation splits.

Every loader yields ``(float32 [C, H, W], int label)`` normalised as ``(pixel - mean) / std`` with
the model's per-channel statistics in pixel units.
"""

from lowbit.data.imagefolder import imagenet_class_names, imagenet_synsets
from lowbit.data.registry import image_shape, list_datasets, load_dataset
from lowbit.data.splits import calib_eval_split, make_loader, subset

__all__ = [
    "calib_eval_split",
    "image_shape",
    "imagenet_class_names",
    "imagenet_synsets",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "subset",
]
