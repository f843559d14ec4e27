"""Loading checkpoints into lowbit models with errors a user can act on.

``torch.load_state_dict`` reports problems as long tracebacks listing every key; here a failure
is one ``ModelError`` naming the file and the first offending key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ModelError

_WRAPPER_KEYS = ("state_dict", "model")
_OPTIONAL_SUFFIX = "num_batches_tracked"


def _short(exc: BaseException) -> str:
    """First line of an exception message, so errors stay one readable line."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _read(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelError(
                f"could not read {path} as a safetensors file ({_short(exc)}); "
                "it may be corrupt, truncated or not a safetensors file"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"could not read {path} as a PyTorch checkpoint ({_short(exc)}); it may be corrupt, "
            "truncated, or hold Python objects that weights_only loading refuses"
        ) from None


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` and drop a DataParallel prefix."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(
            f"{path} is not a plain state dict: entry {bad[0]!r} is not a tensor "
            f"({len(bad)} such entries)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_finite(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Refuse NaN/Inf weights: they evaluate without error to a chance-level top-1."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ModelError(
            f"{path}: {len(bad)} tensor(s) hold NaN or Inf values (first: {bad[0]!r}); the file "
            "is corrupt or was saved from a diverged run: use the weights from before it diverged"
        )


def load_weights(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Load a ``.safetensors`` or ``torch.save`` state dict into ``model`` and return it.

    BatchNorm ``num_batches_tracked`` counters absent from the file are not treated as missing:
    checkpoints from older PyTorch and many safetensors exports drop them, and they play no
    part in inference. With ``strict=False`` missing and unexpected keys are ignored, but shapes
    of the keys that do match must still agree.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"weights file not found: {path}")
    if not path.is_file():
        raise ModelError(f"weights path is not a file: {path}")
    state = _as_state_dict(_read(path), path)
    check_finite(state, path)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]!r})")
        raise ModelError(
            f"{path} does not match {type(model).__name__}: "
            + ", ".join(parts)
            + "; is it the weights file for this model?"
        )
    for key, want in expected.items():
        if key in state and state[key].shape != want.shape:
            raise ModelError(
                f"{path}: shape mismatch for {key!r}: model expects "
                f"{tuple(want.shape)}, file has {tuple(state[key].shape)}"
            )

    to_load = {k: v for k, v in state.items() if k in expected}
    for key, value in expected.items():
        if key not in to_load and key.endswith(_OPTIONAL_SUFFIX):
            to_load[key] = value
    try:
        model.load_state_dict(to_load, strict=strict)
    except RuntimeError as exc:
        raise ModelError(
            f"could not load {path} into {type(model).__name__}: {_short(exc)}"
        ) from None
    return model
