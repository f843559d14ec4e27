"""Registry and entry point for post-training quantization methods.

Each method is one typed config class (:mod:`lowbit.ptq.configs`) and one handler registered
for it::

    @register_ptq(RapqConfig)
    def rapq_ptq(model, config, calib_data, example_inputs, method_config, *, progress,
                 block_types=None) -> nn.Module: ...

:func:`ptq` builds the config from a method name and keyword options (or takes a config
object) and calls the handler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError
from ..memory import reusing_freed_memory
from .configs import MethodConfig, method_config_from_dict, read_method_config


@dataclass(frozen=True)
class PTQMethod:
    """A registered method: its config class and its handler."""

    name: str
    config: type[MethodConfig]
    fn: Callable[..., nn.Module]


PTQ_METHODS: dict[str, PTQMethod] = {}


def register_ptq(config_cls: type[MethodConfig]):
    """Register the decorated handler for ``config_cls`` under its ``method`` name."""
    name = config_cls.model_fields["method"].default
    if not isinstance(name, str):
        raise ConfigError(f"{config_cls.__name__} must give its 'method' field a default name")

    def wrap(fn):
        if name in PTQ_METHODS and PTQ_METHODS[name].fn is not fn:
            raise ConfigError(f"a PTQ method named {name!r} is already registered")
        PTQ_METHODS[name] = PTQMethod(name, config_cls, fn)
        return fn

    return wrap


def _method(name: str) -> PTQMethod:
    if name not in PTQ_METHODS:
        raise ConfigError(f"unknown PTQ method {name!r}; choose one of {sorted(PTQ_METHODS)}")
    return PTQ_METHODS[name]


def method_config(method: str | MethodConfig, **options: Any) -> MethodConfig:
    """The typed config of ``method`` (a name, or a config whose fields ``options`` replace).
    An option the method does not take is refused, naming the methods that do take it."""
    start = method.to_dict() if isinstance(method, MethodConfig) else {"method": method}
    cls = _method(start["method"]).config
    unknown = sorted(set(options) - set(cls.model_fields))
    if unknown:
        takers = sorted(n for n, m in PTQ_METHODS.items()
                        if all(k in m.config.model_fields for k in unknown))
        where = f"; {', '.join(takers)} take {'it' if len(unknown) == 1 else 'them'}" if takers \
            else ""
        raise ConfigError(f"PTQ method {start['method']!r} takes no option {', '.join(unknown)}"
                          f"{where}; its options: {sorted(set(cls.model_fields) - {'method'})}")
    classes = {n: m.config for n, m in PTQ_METHODS.items()}
    return method_config_from_dict(classes, {**start, **options}, "PTQ options")


def load_method_config(path: str | Path) -> MethodConfig:
    """A method config from a YAML/JSON file: the config's mapping itself (``method: rapq``,
    then its options), or a file holding it under ``method_config`` (a results JSON of
    ``lowbit ptq -o``, a benchmark config)."""
    classes = {n: m.config for n, m in PTQ_METHODS.items()}
    return method_config_from_dict(classes, read_method_config(path), f"method config {path}")


@reusing_freed_memory
def ptq(
    model: nn.Module,
    method: str | MethodConfig,
    calib_data: Iterable,
    config: QuantConfig | None = None,
    example_inputs=None,
    *,
    progress: bool = True,
    block_types: tuple[type[nn.Module], ...] | None = None,
    **options: Any,
) -> nn.Module:
    """Quantize a float ``model`` with the PTQ ``method`` on ``calib_data``; returns a copy.

    ``method`` is a registered name with its options as keywords (``ptq(m, "rapq", data,
    iters=300)``) or a config (``ptq(m, RapqConfig(iters=300), data)``). ``block_types``:
    module classes that reconstruction treats as one unit each (rapq, brecq).
    """
    mc = method_config(method, **options)
    runtime: dict[str, Any] = {"progress": progress}
    if block_types is not None:
        if not hasattr(mc, "recon_options"):
            raise ConfigError(f"block_types applies to reconstruction (rapq, brecq), not to "
                              f"{mc.method!r}")
        runtime["block_types"] = block_types
    return _method(mc.method).fn(model, config or QuantConfig(), calib_data, example_inputs, mc,
                                 **runtime)
