"""SDQ bitwidth search: learn each layer's weight bits by gradient descent toward a budget.

Every searchable layer's weight gets an :class:`~lowbit.quant.sdq.SDQQuantizer` starting at
``max_bits``. Each step trains weights, LSQ steps and DBPs on

    task loss + cost_weight * expected_cost / budget,

where the expected cost uses ``b - p`` bits per layer (exact, because every budget kind is
linear in the per-layer bits) and ``cost_weight`` grows by ``cost_growth`` at every check that
ends over budget, so layers whose task loss resists longest keep their bits. Every ``check_every`` steps the DBPs are read once (one device
sync) and each layer whose DBP reached ``threshold`` steps down one bit, most settled first,
until the deterministic cost meets the budget. If the step limit comes first, the remaining
layers are stepped down greedily (highest DBP, then largest cost) and the result says so.

The result is a plain LSQ :class:`~lowbit.config.QuantConfig` with one exact-name rule per
searched layer: re-applying it with :func:`lowbit.prepare` gives the same bits, and its cost,
measured by :func:`lowbit.cost.measure`, meets the budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..config import EdgePolicy, LayerRule, QuantConfig, _validate
from ..cost.model import CostReport, measure
from ..errors import ConfigError, DataError, TrainingError
from ..prepare import calibrate, prepare, quant_layers, quantizers
from ..quant.base import check_bits
from ..quant.sdq import SDQQuantizer
from ..report.tables import format_table
from ..utils import atomic_write_text, model_device
from .budget import Budget


class SDQSettings(BaseModel):
    """Every option of the SDQ search (the CLI flags map onto these fields)."""

    model_config = ConfigDict(extra="forbid")

    min_bits: int = Field(
        2, description="lowest weight bits a searched layer may get (1: binary weights)"
    )
    max_bits: int = Field(8, description="bits every searched layer starts from")
    a_bits: int | None = Field(4, description="activation bits (None: float activations)")
    first_last: EdgePolicy = Field(
        EdgePolicy.INT8, description="first/last layer: 8bit or float (not searched), same (searched)"
    )
    per_channel: bool = True
    observer: str = Field("mse", description="range observer that initialises the LSQ steps")
    steps: int = Field(2000, ge=1, description="maximum search steps")
    check_every: int = Field(20, ge=1, description="steps between step-down checks")
    threshold: float = Field(0.9, gt=0, le=1, description="DBP at which a layer steps down")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of weights and biases")
    quant_lr: float = Field(1e-3, gt=0, description="Adam learning rate of LSQ steps")
    dbp_lr: float = Field(0.02, gt=0, description="Adam learning rate of the DBPs")
    cost_weight: float = Field(1.0, ge=0, description="initial weight of the cost term")
    cost_growth: float = Field(
        1.05, ge=1, description="cost weight multiplier at each check that ends over budget"
    )
    calib_batches: int = Field(8, ge=1, description="batches to initialise the LSQ steps")
    seed: int = 0

    @model_validator(mode="after")
    def _bounds(self) -> SDQSettings:
        check_bits(self.min_bits, signed=True, quantizer=SDQQuantizer)
        check_bits(self.max_bits, signed=True, quantizer=SDQQuantizer)
        if self.a_bits is not None:
            check_bits(self.a_bits)
        if self.min_bits >= self.max_bits:
            raise ConfigError(
                f"bits bounds reversed or empty: min_bits {self.min_bits} must be below "
                f"max_bits {self.max_bits} (e.g. --min-bits 2 --max-bits 8)"
            )
        return self


def search_config(settings: SDQSettings) -> QuantConfig:
    """The config the search prepares with: SDQ weights at ``max_bits``, LSQ activations."""
    cfg = final_config(settings, {})
    weight = cfg.weight.model_copy(update={"kind": "sdq", "options": {"min_bits": settings.min_bits}})
    return cfg.model_copy(update={"weight": weight})


def final_config(settings: SDQSettings, bits: dict[str, int]) -> QuantConfig:
    """LSQ config with one exact-name rule per searched layer (what retraining applies)."""
    return QuantConfig.uniform(
        settings.max_bits, settings.a_bits, kind="lsq", per_channel=settings.per_channel,
        first_last=settings.first_last, observer=settings.observer,
        layers=[LayerRule(match=n, w_bits=b) for n, b in bits.items()],
    )


@dataclass
class SDQResult:
    """A finished search: the config, the bits it chose and how the budget was met."""

    config: QuantConfig
    bits: dict[str, int]
    budget: Budget
    achieved: float
    start_cost: float
    min_cost: float
    steps: int
    forced: list[str]
    settings: SDQSettings
    cost: CostReport
    history: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def met(self) -> bool:
        return self.budget.met_by(self.achieved)

    def rows(self) -> list[dict[str, Any]]:
        return [dict(layer=r.name, type=r.type, params=r.params, macs=r.macs, w_bits=r.w_bits,
                     a_bits=r.a_bits, searched=r.name in self.bits) for r in self.cost.layers]

    def table(self) -> str:
        head = format_table(self.rows(), ["layer", "type", "params", "macs", "w_bits", "a_bits",
                                          "searched"])
        t = self.cost.totals()
        return (f"{head}\nbudget {self.budget.describe()}: achieved "
                f"{self.budget.describe(self.achieved)} in {self.steps} steps"
                f"{f' ({len(self.forced)} forced step-downs)' if self.forced else ''}; "
                f"average weight bits {t['avg_weight_bits']:.3f}, "
                f"GBitOPs {t['bitops'] / 1e9:.4f}, weights {t['size_bytes'] / 1024:.1f} KiB")

    def to_dict(self) -> dict[str, Any]:
        return dict(
            method="sdq", budget=self.budget.model_dump(mode="json"), achieved=self.achieved,
            met=self.met, start_cost=self.start_cost, min_cost=self.min_cost, steps=self.steps,
            forced=self.forced, bits=self.bits, settings=self.settings.model_dump(mode="json"),
            cost=self.cost.totals(), layers=self.rows(), history=self.history,
            config=self.config.to_dict(),
        )

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
            names = [r.name for r in self.cost.layers]
            out["plot"] = plot_bits(
                names, [r.w_bits for r in self.cost.layers], directory / "bits.png",
                f"SDQ, budget {self.budget.describe()}\nachieved {self.budget.describe(self.achieved)}",
            )
        return out


def _cycle(data: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise DataError("the training data is empty: pass at least one (input, target) batch")


def _searchable(qmodel: nn.Module, config: QuantConfig) -> list[tuple[str, SDQQuantizer]]:
    report = qmodel.lowbit_report
    fixed = set()
    if config.first_layer is not EdgePolicy.SAME:
        fixed.add(report.first_layer)
    if config.last_layer is not EdgePolicy.SAME:
        fixed.add(report.last_layer)
    found = []
    for name, layer in quant_layers(qmodel):
        wq = layer.weight_quant
        if isinstance(wq, SDQQuantizer):
            wq.searching = name not in fixed
            wq.dbp.requires_grad_(wq.searching)
            if wq.searching:
                found.append((name, wq))
    if not found:
        raise ConfigError(
            "no layer is left to search: the model has no quantizable conv/linear layers besides "
            "the first/last ones; use first_last='same' to search those too"
        )
    return found


def check_budget(budget: Budget, start: float, lowest: float, settings: SDQSettings) -> None:
    """Refuse budgets the search cannot or need not work on, saying what would work."""
    if not budget.met_by(lowest):
        raise ConfigError(
            f"budget {budget.describe()} cannot be met: with every searched layer at "
            f"min_bits={settings.min_bits} the model needs {budget.describe(lowest)}; raise the "
            f"budget, lower --min-bits, or keep the first/last layer in float"
        )
    if budget.met_by(start):
        raise ConfigError(
            f"budget {budget.describe()} is already met with every searched layer at "
            f"max_bits={settings.max_bits} ({budget.describe(start)}): there is nothing to "
            "search; lower the budget or use a uniform config"
        )


def sdq_search(
    model: nn.Module,
    data: Iterable,
    budget: Budget | str | float,
    example_inputs,
    settings: SDQSettings | None = None,
    *,
    progress: bool = True,
    **overrides: Any,
) -> SDQResult:
    """Search per-layer weight bits for float ``model`` on ``(input, target)`` batches.

    ``data`` is any iterable of training batches, cycled as needed; ``example_inputs`` fixes the
    execution order and the per-sample cost. ``overrides`` set :class:`SDQSettings` fields.
    """
    from tqdm.auto import tqdm

    if not isinstance(budget, Budget):
        budget = Budget.parse(budget)
    if settings is None:
        settings = _validate(SDQSettings, overrides, "SDQ settings")
    elif overrides:
        settings = _validate(SDQSettings, {**settings.model_dump(), **overrides}, "SDQ settings")
    torch.manual_seed(settings.seed)
    cfg = search_config(settings)
    qmodel = prepare(model, cfg, example_inputs)
    searched = _searchable(qmodel, cfg)
    names = [n for n, _ in searched]
    const, coef = budget.coefficients(measure(qmodel, example_inputs), names)
    cost_of = lambda bits: const + sum(c * b for c, b in zip(coef, bits, strict=True))  # noqa: E731
    start = cost_of([settings.max_bits] * len(names))
    lowest = cost_of([settings.min_bits] * len(names))
    check_budget(budget, start, lowest, settings)

    calibrate(qmodel, data, num_batches=settings.calib_batches, progress=progress)
    dev = model_device(qmodel)
    dbps = [q.dbp for _, q in searched]
    dbp_ids = {id(p) for p in dbps}
    quant_ids = {id(p) for q in quantizers(qmodel) for p in q.parameters()}
    weights = [p for p in qmodel.parameters() if p.requires_grad and id(p) not in quant_ids]
    quant = [p for p in qmodel.parameters()
             if p.requires_grad and id(p) in quant_ids and id(p) not in dbp_ids]
    opt = torch.optim.Adam([
        {"params": weights, "lr": settings.lr},
        {"params": quant, "lr": settings.quant_lr},
        {"params": dbps, "lr": settings.dbp_lr},
    ])
    coef_t = torch.tensor(coef, dtype=torch.float32, device=dev)
    history: list[dict[str, float]] = []
    forced: list[str] = []
    batches = _cycle(data)
    loss_sum = torch.zeros((), device=dev)
    task_sum = torch.zeros((), device=dev)
    qmodel.train()
    met, step, since = False, 0, 0
    cost_weight = settings.cost_weight
    bar = tqdm(total=settings.steps, desc="sdq search", disable=not progress, leave=False)
    try:
        while step < settings.steps and not met:
            x, y = next(batches)[:2]
            x, y = x.to(dev), y.to(dev)
            out = qmodel(x)
            task = F.cross_entropy(out, y)
            expected = const + (coef_t * torch.stack([q.expected_bits() for _, q in searched])).sum()
            loss = task + cost_weight * expected / budget.value
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p in dbps:
                    p.clamp_(0.0, 1.0)
            loss_sum += loss.detach()
            task_sum += task.detach()
            step += 1
            since += 1
            bar.update(1)
            if step % settings.check_every == 0 or step == settings.steps:
                met = _check(searched, opt, cost_of, budget, settings.threshold, history, step,
                             loss_sum / since, task_sum / since, expected.detach(), bar)
                history[-1]["cost_weight"] = cost_weight
                cost_weight *= settings.cost_growth
                loss_sum.zero_()
                task_sum.zero_()
                since = 0
    finally:
        bar.close()
    if not met:
        forced = _force(searched, coef, cost_of, budget)
    qmodel.eval()
    for _, q in searched:
        q.searching = False
    bits = {n: q.bits for n, q in searched}
    predicted = cost_of(list(bits.values()))
    config = final_config(settings, bits)
    final = prepare(model, config, example_inputs)
    report = measure(final, example_inputs)
    achieved = budget.measure(report)
    if not budget.met_by(achieved) or abs(achieved - predicted) > 1e-6 * max(1.0, abs(achieved)):
        raise TrainingError(
            f"internal check failed: the found config measures {budget.describe(achieved)}, "
            f"predicted {budget.describe(predicted)}, budget {budget.describe()}; please report"
        )
    return SDQResult(config, bits, budget, achieved, start, lowest, step, forced, settings,
                     report, history, qmodel)


def _check(searched, opt, cost_of, budget, threshold, history, step, loss_sum, task_sum,
           expected, bar) -> bool:
    """Step down settled layers (most settled first) while the budget is not met."""
    probs = torch.cat([q.dbp.detach() for _, q in searched] +
                      [torch.stack([loss_sum, task_sum, expected])]).tolist()
    n = len(searched)
    p, (loss, task, exp_cost) = probs[:n], probs[n:]
    if not all(math.isfinite(v) for v in probs):
        raise TrainingError(
            f"the search loss or a DBP became NaN/Inf by step {step}; lower lr, quant_lr or "
            "dbp_lr (--lr, --quant-lr, --dbp-lr), or check the data for NaN"
        )
    cost = cost_of([q.bits for _, q in searched])
    order = sorted(range(n), key=lambda i: -p[i])
    for i in order:
        if budget.met_by(cost) or p[i] < threshold:
            break
        q = searched[i][1]
        if q.can_step_down:
            q.step_down()
            opt.state.pop(q.dbp, None)
            cost = cost_of([q.bits for _, q in searched])
    history.append(dict(step=step, loss=loss, task_loss=task, expected_cost=exp_cost, cost=cost,
                        bits=[q.bits for _, q in searched], dbp=p))
    bar.set_postfix(cost=budget.describe(cost), loss=f"{task:.3f}")
    return budget.met_by(cost)


def _force(searched, coef, cost_of, budget) -> list[str]:
    """Greedy finish when the step limit came first: if one step-down meets the budget, the one
    that overshoots least; otherwise the most settled DBP (then the largest cost)."""
    forced = []
    p = torch.cat([q.dbp.detach() for _, q in searched]).tolist()
    while not budget.met_by(cost := cost_of([q.bits for _, q in searched])):
        movable = [i for i, (_, q) in enumerate(searched) if q.can_step_down]
        enough = [j for j in movable if budget.met_by(cost - coef[j])]
        if enough:
            i = min(enough, key=lambda j: coef[j])
        else:
            i = max(movable, key=lambda j: (p[j], coef[j]))
        searched[i][1].step_down()
        p[i] = searched[i][1].init_dbp
        forced.append(searched[i][0])
    return forced


__all__ = [
    "SDQResult", "SDQSettings", "check_budget", "final_config", "sdq_search", "search_config",
]
