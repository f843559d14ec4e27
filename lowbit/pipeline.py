"""Glue used by the CLI, the demo and the benchmarks: a model with its data, and saving a
quantized model so it can be re-applied.

Library users can ignore this module: ``prepare`` / ``calibrate`` / ``ptq`` take any model and
any iterable of batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from .config import QuantConfig
from .data import calib_eval_split, load_dataset, make_loader, subset
from .errors import ModelError
from .models import ModelSpec, get_spec
from .prepare import prepare, set_mode
from .utils import atomic_write, atomic_write_text

SPLIT_DATASETS = {"imagenet", "imagenette"}


@dataclass
class DataBundle:
    """Calibration and evaluation loaders for one model, with an example input batch."""

    calib: DataLoader
    eval: DataLoader
    example: torch.Tensor
    dataset: str
    protocol: str


def build_data(
    spec: ModelSpec,
    dataset: str | None = None,
    root: str | Path | None = None,
    *,
    calib_size: int = 1024,
    eval_size: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
) -> DataBundle:
    """Fixed, seeded calibration/evaluation data for ``spec``.

    CIFAR and digits calibrate on a seeded subset of the training set and evaluate on the test
    set; ImageNet-style folders have only ``val``, split into a calibration subset and the rest.
    """
    name = (dataset or spec.default_dataset).lower()
    kwargs = dict(mean=spec.mean, std=spec.std, crop=spec.input_size[-1])
    if spec.resize is not None:
        kwargs["resize"] = spec.resize
    if name in SPLIT_DATASETS:
        val = load_dataset(name, root, "val", **kwargs)
        calib, evaluation = calib_eval_split(val, calib_size, seed)
        protocol = (
            f"{name}/val: {len(calib)} seeded calibration images (seed {seed}), "
            f"evaluation on the other {len(evaluation)}"
        )
    else:
        train = load_dataset(name, root, "train", **kwargs)
        calib = subset(train, min(calib_size, len(train)), seed)
        evaluation = load_dataset(name, root, "test", **kwargs)
        protocol = (
            f"{name}: {len(calib)} seeded training images for calibration (seed {seed}), "
            f"evaluation on the test set"
        )
    if eval_size is not None and eval_size < len(evaluation):
        evaluation = subset(evaluation, eval_size, seed)
        protocol += f" (seeded subset of {eval_size})"
    calib_loader = make_loader(calib, batch_size, workers=workers)
    eval_loader = make_loader(evaluation, batch_size, workers=workers)
    example = next(iter(make_loader(calib, min(batch_size, 8))))[0]
    return DataBundle(calib_loader, eval_loader, example, name, protocol)


def example_input(spec: ModelSpec, batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, *spec.input_size)


def save_quantized(model: nn.Module, directory: str | Path, meta: dict | None = None) -> Path:
    """Write ``model.safetensors`` (state dict), ``config.yaml`` and ``meta.json`` to a folder."""
    directory = Path(directory)
    config: QuantConfig = getattr(model, "lowbit_config", None)
    if config is None:
        raise ModelError("model was not prepared by lowbit (no lowbit_config): nothing to save")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda p: save_file(state, p))
    config.save(directory / "config.yaml")
    atomic_write_text(directory / "meta.json", json.dumps(meta or {}, indent=2))
    return directory


def load_quantized(model: nn.Module, directory: str | Path, example_inputs) -> nn.Module:
    """Re-apply a saved quantized model: prepare with its config, load its state, quantize."""
    directory = Path(directory)
    if not (directory / "config.yaml").is_file():
        raise ModelError(
            f"{directory} holds no config.yaml: pass a folder written by 'lowbit ptq --save'"
        )
    config = QuantConfig.load(directory / "config.yaml")
    qmodel = prepare(model, config, example_inputs)
    path = directory / "model.safetensors"
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ModelError(f"could not read {path}: {exc}; the file is missing or corrupt") from None
    from .ptq.pot_rescale import restore_clamps

    restore_clamps(qmodel, state)  # ReLU6s that power-of-two rescaling made per-channel
    expected = set(qmodel.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(
            f"{path} does not match the model prepared from its config.yaml: "
            f"{len(missing)} missing (first: {missing[:1]}), {len(unexpected)} unexpected "
            f"(first: {unexpected[:1]}); was it saved from another model?"
        )
    qmodel.load_state_dict(state)
    return set_mode(qmodel, "quantize")


__all__ = [
    "DataBundle", "build_data", "example_input", "get_spec", "load_quantized", "save_quantized",
]
