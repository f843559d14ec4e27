"""Named PTQ recipes of the benchmarks: one YAML file each under benchmarks/configs/.

A recipe is a typed method config (``method_config``, :mod:`lowbit.ptq.configs`) and the
``QuantConfig.uniform`` options it needs besides the bits (``quant``). Rows from before the
named configs name their recipe in the old ``+`` label (``rapq+dw+rs``); :func:`row_config`
maps them (benchmarks/configs/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"
QUANT_KEYS = {"dw_act_per_channel", "narrow_weights", "dw_weight_bits"}


@dataclass(frozen=True)
class Recipe:
    name: str
    method_config: Any  # lowbit.ptq.MethodConfig
    quant: dict[str, bool | int]

    def build(self, **overrides):
        """The method config with ``overrides`` that it takes (``None`` values and options of
        other methods are left out), so one benchmark flag serves every recipe."""
        from lowbit.ptq import method_config

        fields = type(self.method_config).model_fields
        given = {k: v for k, v in overrides.items() if v is not None and k in fields}
        return method_config(self.method_config, **given)

    def quant_config(self, w_bits: int, a_bits: int | None):
        from lowbit import QuantConfig

        return QuantConfig.uniform(w_bits, a_bits, **self.quant)


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    """The recipe ``benchmarks/configs/<name>.yaml``; unknown names and bad files are a
    ``ConfigError`` naming the fix."""
    from lowbit.config import read_yaml_mapping
    from lowbit.errors import ConfigError
    from lowbit.ptq import load_method_config

    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no benchmark config {name!r}; choose one of {config_names()}")
    data = read_yaml_mapping(path, "benchmark config")
    extra = set(data) - {"method_config", "quant"}
    quant = data.get("quant") or {}
    if extra or not isinstance(quant, dict) or set(quant) - QUANT_KEYS:
        raise ConfigError(f"benchmark config {path} may hold 'method_config' and 'quant' (keys "
                          f"{sorted(QUANT_KEYS)}) only")
    return Recipe(name, load_method_config(path),
                  {k: int(v) if k == "dw_weight_bits" else bool(v) for k, v in quant.items()})


def row_config(row: dict) -> str:
    """The config name of a result row: its ``config``, or for rows from before the named
    configs, their ``+`` label with ``-`` (``rapq+dw+rs`` ran what ``rapq-dw-rs`` holds)."""
    return row.get("config") or row["method"].replace("+", "-")


def bias_corrected(row: dict) -> bool:
    """Whether ``row``'s recipe ended with bias correction."""
    if "method_config" in row:
        return bool(row["method_config"].get("bias_correction"))
    return "bc" in row["method"].split("+")
