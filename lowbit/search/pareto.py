"""Pareto sweep: search at several budgets, score each result, keep the non-dominated ones.

Any registered search runs the sweep (``method``, default ``"sdq"``); it reads only the
:class:`~lowbit.search.SearchResult` each returns. As AIMET does, the caller keeps the data
loop: ``score(result) -> accuracy`` decides how a found config is retrained and evaluated (:class:`RetrainScorer`, the usual choice, retrains it
with the shared QAT trainer). The sweep returns every point, marks the Pareto front (fewer
BitOPs, higher accuracy) and writes a CSV and an accuracy-vs-BitOPs PNG.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import ConfigError
from ..evaluate import evaluate
from ..utils import atomic_write_text
from .budget import Budget
from .registry import run_search
from .result import SearchResult

if TYPE_CHECKING:
    from ..qat.trainer import TrainConfig

COLUMNS = ["label", "method", "budget_kind", "budget", "avg_weight_bits", "bitops", "size_bytes", "top1",
           "steps", "forced", "on_front"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(cost, accuracy)`` points no other point beats on both (ties kept)."""
    front = []
    for i, (c, a) in enumerate(points):
        dominated = any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for c2, a2 in points)
        if not dominated:
            front.append(i)
    return front


@dataclass
class ParetoResult:
    """Rows of a sweep (one per budget, plus optional baselines such as uniform LSQ)."""

    rows: list[dict[str, Any]]
    baselines: list[dict[str, Any]] = field(default_factory=list)
    results: list[SearchResult] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.mark_front()

    def mark_front(self) -> None:
        everything = self.rows + self.baselines
        front = set(pareto_front([(r["bitops"], r["top1"]) for r in everything]))
        for i, r in enumerate(everything):
            r["on_front"] = i in front

    def front(self) -> list[dict[str, Any]]:
        return [r for r in self.rows + self.baselines if r["on_front"]]

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in self.rows + self.baselines:
            writer.writerow(r)
        return buf.getvalue()

    def save(self, directory: str | Path, plot: bool | None = None, title: str = "") -> dict:
        """Write ``pareto.csv`` and, with matplotlib (or ``plot=True``), ``pareto.png``."""
        from .plots import have_matplotlib, plot_pareto

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = {"csv": directory / "pareto.csv"}
        atomic_write_text(out["csv"], self.to_csv())
        if plot or (plot is None and have_matplotlib()):
            pts = [(r["bitops"] / 1e9, r["top1"], r["label"]) for r in self.rows]
            front = [(r["bitops"] / 1e9, r["top1"]) for r in self.front()]
            base = [(r["bitops"] / 1e9, r["top1"], r["label"]) for r in self.baselines]
            methods = sorted({str(r.get("method", "search")) for r in self.rows}) or ["search"]
            out["plot"] = plot_pareto(pts, front, directory / "pareto.png", title, base,
                                      series=", ".join(methods).upper())
        return out


def row_of(result: SearchResult, top1: float, label: str | None = None) -> dict[str, Any]:
    return dict(label=label or result.label(), **result.summary(), top1=top1)


def pareto_sweep(
    model: nn.Module,
    data: Iterable,
    budgets: Sequence[Budget | str | float],
    example_inputs,
    score: Callable[[SearchResult], float],
    settings: Any = None,
    *,
    method: str = "sdq",
    output_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    plot: bool | None = None,
    title: str = "",
    **overrides: Any,
) -> ParetoResult:
    """Run the registered search ``method`` at each budget and score it. With ``output_dir``,
    each point's search checkpoints and saves its result under ``output_dir/<i>_<budget>/``
    (``resume=True`` continues an interrupted sweep) and the sweep writes ``pareto.csv`` (and,
    per ``plot``, the PNGs). Budgets are searched in the order given."""
    if not budgets:
        raise ConfigError("give at least one budget for a Pareto sweep")
    rows, results = [], []
    for i, b in enumerate(budgets):
        budget = b if isinstance(b, Budget) else Budget.parse(b)
        where = (Path(output_dir) / point_folder(i, budget)) if output_dir is not None else None
        result = run_search(method, model, data, budget, example_inputs, settings,
                            progress=progress, output_dir=where, resume=resume, **overrides)
        top1 = float(score(result))
        rows.append(row_of(result, top1))
        results.append(result)
        if where is not None:
            result.save(where, plot=plot)
    sweep = ParetoResult(rows, results=results)
    if output_dir is not None:
        sweep.save(output_dir, plot=plot, title=title)
    return sweep


def point_folder(i: int, budget: Budget) -> str:
    """Folder name of the ``i``-th sweep point (its search checkpoint and result files)."""
    return f"{i:02d}_{budget.kind.value}_{budget.value:g}"


class RetrainScorer:
    """``score(result)``: retrain the float ``model`` with the found config through the shared
    QAT trainer (LSQ, :func:`lowbit.qat.qat`), evaluate it, return top-1.

    The sweep uses the same trainer as ``lowbit qat`` and the SDQ recipe, so a sweep point and a
    full retraining differ only in their :class:`~lowbit.qat.TrainConfig`. ``loss_terms`` (EBR,
    KD, any ``term(model, inputs, outputs, targets)``) are added through
    :func:`lowbit.losses.as_hook`. ``calib_data`` defaults to ``train_data``. The last retrained
    :class:`~lowbit.qat.QATResult` is kept in ``last`` (only the last, so a sweep over a large
    model holds one copy).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Iterable,
        eval_data: Iterable,
        example_inputs,
        *,
        train: TrainConfig | None = None,
        loss_terms: Sequence = (),
        calib_data: Iterable | None = None,
        calib_batches: int | None = 8,
        progress: bool = True,
    ):
        from ..qat.trainer import TrainConfig

        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.example_inputs = example_inputs
        self.train = train if train is not None else TrainConfig(progress=progress, logger="none")
        self.loss_terms = list(loss_terms)
        self.calib_data = calib_data if calib_data is not None else train_data
        self.calib_batches = calib_batches
        self.progress = progress
        self.last = None

    def __call__(self, result: SearchResult) -> float:
        from ..losses import as_hook
        from ..qat.api import qat

        self.last = qat(self.model, "lsq", self.train_data, calib_data=self.calib_data,
                        example_inputs=self.example_inputs, config=result.config,
                        train=self.train, hooks=[as_hook(t) for t in self.loss_terms],
                        calib_batches=self.calib_batches)
        return evaluate(self.last.model, self.eval_data, progress=self.progress, desc="eval").top1

