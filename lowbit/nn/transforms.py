"""Structural changes a pass makes to a prepared model, recorded so a saved model reloads.

``prepare`` rebuilds a saved model from its config; a pass that then swapped a module (e.g.
power-of-two rescaling turning a ReLU6 into a per-channel :class:`ChannelClamp`) records the swap
in ``model.lowbit_transforms``, ``save_quantized`` writes the list next to the weights, and
:func:`replay` makes the same swaps before the state dict loads.
"""

from __future__ import annotations

from torch import nn

from ..errors import ModelError
from .layers import ChannelClamp

CHANNEL_CLAMP = "channel_clamp"


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def record(model: nn.Module, op: str, module: str) -> None:
    """Note that ``module`` of ``model`` was replaced by ``op`` (once per module)."""
    entry = {"op": op, "module": module}
    transforms = model.__dict__.setdefault("lowbit_transforms", [])
    if entry not in transforms:
        transforms.append(entry)


def replay(model: nn.Module, transforms: list[dict] | None, state: dict) -> list[str]:
    """Apply recorded swaps to a freshly prepared ``model`` so ``state`` loads into it.

    ``transforms=None`` (a folder saved before swaps were recorded) infers them from the
    state: a ``<name>.upper`` buffer where the model has a Hardtanh is a ChannelClamp.
    """
    if transforms is None:
        transforms = [{"op": CHANNEL_CLAMP, "module": k[: -len(".upper")]} for k in state
                      if k.endswith(".upper")]
    done = []
    for t in transforms:
        name = t.get("module", "")
        if t.get("op") != CHANNEL_CLAMP:
            raise ModelError(f"saved model records an unknown transform {t!r}; it was written by "
                             "a newer lowbit: upgrade lowbit to load it")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        key = f"{name}.upper"
        if isinstance(mod, nn.Hardtanh) and key in state:
            set_submodule(model, name, ChannelClamp(state[key]))
            record(model, CHANNEL_CLAMP, name)
            done.append(name)
    return done
