"""Resource budgets for mixed-precision search, as typed objects (the way Sony MCT states them).

A budget is read from :func:`lowbit.cost.measure` on the prepared model, so "met" means met by
the numbers every lowbit report shows. Each kind is linear in the per-layer weight bits, which
lets the search predict the cost of any bit assignment exactly from one measurement.
"""

from __future__ import annotations

import re
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from ..cost.model import CostReport
from ..errors import ConfigError


class BudgetKind(str, Enum):
    AVG_WEIGHT_BITS = "avg_weight_bits"
    BITOPS = "bitops"
    WEIGHT_MEMORY = "weight_memory"


UNITS = {
    BudgetKind.AVG_WEIGHT_BITS: "bits",
    BudgetKind.BITOPS: "BitOPs",
    BudgetKind.WEIGHT_MEMORY: "bytes",
}
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
           "kib": 1024.0, "mib": 1024.0**2, "gib": 1024.0**3, "b": 1.0}
_ALIASES = {"avg_bits": BudgetKind.AVG_WEIGHT_BITS, "bits": BudgetKind.AVG_WEIGHT_BITS,
            "memory": BudgetKind.WEIGHT_MEMORY, "size": BudgetKind.WEIGHT_MEMORY}


class Budget(BaseModel):
    """At most ``value`` of ``kind``: average weight bits, BitOPs per sample, or weight bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: BudgetKind = BudgetKind.AVG_WEIGHT_BITS
    value: float = Field(gt=0)

    @classmethod
    def parse(cls, text: str | float) -> Budget:
        """``"2"``/``"avg_weight_bits:2"``, ``"bitops:1.2G"``, ``"weight_memory:64KiB"``."""
        if isinstance(text, (int, float)):
            return cls(value=float(text))
        kind_s, _, val_s = str(text).strip().rpartition(":")
        kind_s = kind_s.strip().lower()
        try:
            kind = _ALIASES.get(kind_s) or BudgetKind(kind_s or "avg_weight_bits")
        except ValueError:
            raise ConfigError(
                f"unknown budget kind {kind_s!r}; write avg_weight_bits:2.5, bitops:1.2G or "
                "weight_memory:64KiB"
            ) from None
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", val_s)
        if m is None or m.group(2).lower() not in _SUFFIX:
            raise ConfigError(
                f"cannot read budget value {val_s!r}; use a number with an optional suffix "
                "(K, M, G, KiB, MiB), e.g. bitops:1.2G"
            )
        try:
            value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
        except ValueError:
            raise ConfigError(f"cannot read budget value {val_s!r} as a number") from None
        if value <= 0:
            raise ConfigError(f"a budget must be positive, got {value}")
        return cls(kind=kind, value=value)

    def measure(self, report: CostReport) -> float:
        """The quantity this budget limits, read from a cost report."""
        if self.kind is BudgetKind.AVG_WEIGHT_BITS:
            return report.avg_weight_bits
        if self.kind is BudgetKind.BITOPS:
            return float(report.bitops)
        return report.size_bytes

    def met_by(self, value: float) -> bool:
        return value <= self.value * (1 + 1e-9)

    def coefficients(self, report: CostReport, names: list[str]) -> tuple[float, list[float]]:
        """``(const, coef)`` with ``measure = const + sum(coef[i] * w_bits[names[i]])``."""
        rows = {r.name: r for r in report.layers}
        missing = [n for n in names if n not in rows]
        if missing:
            raise ConfigError(f"layers {missing[:3]} were not executed by the example input")
        if self.kind is BudgetKind.AVG_WEIGHT_BITS:
            total = sum(r.params for r in report.layers)
            coef = [rows[n].params / max(total, 1) for n in names]
        elif self.kind is BudgetKind.BITOPS:
            coef = [float(rows[n].macs * rows[n].a_bits) for n in names]
        else:
            coef = [(rows[n].params - _bias(rows[n])) / 8 for n in names]
        current = self.measure(report)
        const = current - sum(c * rows[n].w_bits for c, n in zip(coef, names, strict=True))
        return const, coef

    def describe(self, value: float | None = None) -> str:
        v = self.value if value is None else value
        if self.kind is BudgetKind.AVG_WEIGHT_BITS:
            return f"{v:.3f} average weight bits"
        if self.kind is BudgetKind.BITOPS:
            return f"{v / 1e9:.4f} GBitOPs"
        return f"{v / 1024:.2f} KiB of weights"


def _bias(row) -> int:
    """Bias elements of a cost row: its weight bits count weights at ``w_bits``, biases at 32."""
    if row.w_bits == 32:
        raise ConfigError(f"layer {row.name!r} has float weights and cannot be searched")
    return (row.weight_bits - row.params * row.w_bits) // (32 - row.w_bits)
