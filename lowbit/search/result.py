"""What every search returns: the config it found, that config's measured cost, its history.

The Pareto sweep, the CLI and the recipes read only this class, so a new search plugs in by
returning one (its subclass adds what is particular to it, as :class:`~lowbit.search.sdq.SDQResult`
does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import QuantConfig
from ..cost.model import CostReport
from ..report.tables import format_table
from ..utils import atomic_write_text
from .budget import Budget

LAYER_COLUMNS = ["layer", "type", "params", "macs", "w_bits", "a_bits"]


@dataclass
class SearchResult:
    """A found ``config``, its ``cost`` measured by :func:`lowbit.cost.measure`, and ``history``:
    one record per check of the search (step, loss, cost, bits, ...), what the plots draw."""

    config: QuantConfig
    cost: CostReport
    history: list[dict[str, Any]] = field(default_factory=list)
    budget: Budget | None = None
    method: str = "search"

    @property
    def achieved(self) -> float | None:
        """The budgeted quantity of the found config (None without a budget)."""
        return self.budget.measure(self.cost) if self.budget is not None else None

    @property
    def met(self) -> bool:
        return self.budget is None or self.budget.met_by(self.achieved)

    def summary(self) -> dict[str, Any]:
        """The columns a Pareto row takes from a search (the sweep adds label and top-1)."""
        t = self.cost.totals()
        b = self.budget
        return dict(method=self.method, budget_kind=b.kind.value if b else "",
                    budget=b.value if b else None,
                    avg_weight_bits=t["avg_weight_bits"], bitops=t["bitops"],
                    size_bytes=t["size_bytes"])

    def label(self) -> str:
        return self.budget.describe() if self.budget is not None else self.method

    def rows(self) -> list[dict[str, Any]]:
        return [dict(layer=r.name, type=r.type, params=r.params, macs=r.macs, w_bits=r.w_bits,
                     a_bits=r.a_bits) for r in self.cost.layers]

    def table(self) -> str:
        t = self.cost.totals()
        return (f"{format_table(self.rows(), LAYER_COLUMNS)}\naverage weight bits "
                f"{t['avg_weight_bits']:.3f}, GBitOPs {t['bitops'] / 1e9:.4f}, weights "
                f"{t['size_bytes'] / 1024:.1f} KiB")

    def to_dict(self) -> dict[str, Any]:
        return dict(method=self.method,
                    budget=self.budget.model_dump(mode="json") if self.budget else None,
                    achieved=self.achieved, met=self.met, cost=self.cost.totals(),
                    layers=self.rows(), history=self.history, config=self.config.to_dict())

    def save(self, directory: str | Path, plot: bool | None = None) -> dict[str, Path]:
        """Write ``config.yaml``, ``search.json``, ``bits.txt`` and ``bits.png``.

        ``plot=None`` draws the PNG when matplotlib is installed; ``True`` requires it.
        """
        from .plots import have_matplotlib, plot_bits

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = {"config": self.config.save(directory / "config.yaml")}
        out["json"] = directory / "search.json"
        atomic_write_text(out["json"], json.dumps(self.to_dict(), indent=2) + "\n")
        out["table"] = directory / "bits.txt"
        atomic_write_text(out["table"], self.table() + "\n")
        if plot or (plot is None and have_matplotlib()):
            title = f"{self.method}, budget {self.label()}"
            if self.budget is not None:
                title += f"\nachieved {self.budget.describe(self.achieved)}"
            out["plot"] = plot_bits([r.name for r in self.cost.layers],
                                    [r.w_bits for r in self.cost.layers],
                                    directory / "bits.png", title)
        return out
