"""SDQ bitwidth search: learn each layer's weight bits by gradient descent toward a budget.

Every searchable layer's weight gets an :class:`~lowbit.quant.sdq.SDQQuantizer` starting at
``max_bits``. Each step trains weights, LSQ steps and DBPs on

    task loss + cost_weight * expected_cost / budget,

where the expected cost uses ``b - p`` bits per layer (exact, because every budget kind is
linear in the per-layer bits) and ``cost_weight`` grows by ``cost_growth`` at every check that
ends over budget, so layers whose task loss resists longest keep their bits. Every
``check_every`` steps the DBPs are read once (one device sync) and each layer whose DBP reached ``threshold`` steps down one bit, most settled first,
until the deterministic cost meets the budget. If the step limit comes first, the remaining
layers are stepped down greedily (highest DBP, then largest cost) and the result says so.

The steps run on the shared QAT trainer (:mod:`lowbit.search.sdq_hooks`: the cost term is a
loss plug-in, the step-down rule a step hook), so a search checkpoints, resumes and shows the
trainer's progress. The result is a plain LSQ :class:`~lowbit.config.QuantConfig` with one exact-name rule per
searched layer: re-applying it with :func:`lowbit.prepare` gives the same bits, and its cost,
measured by :func:`lowbit.cost.measure`, meets the budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..config import EdgePolicy, LayerRule, QuantConfig, validate_model
from ..cost.model import measure
from ..errors import ConfigError, DataError, TrainingError
from ..losses import as_hook
from ..prepare import calibrate, prepare, quant_layers
from ..qat.hooks import TrainHook
from ..qat.trainer import TrainConfig, Trainer
from ..quant.base import check_bits
from ..quant.sdq import SDQQuantizer
from ..report.tables import format_table
from .budget import Budget
from .registry import register_search
from .result import LAYER_COLUMNS, SearchResult
from .sdq_hooks import ExpectedCost, StepDown


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
    loss: str = Field("ce", description="task loss of the search steps (ce for classifiers, "
                      "l1 or l2 for super-resolution: no labels needed)")
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


@dataclass(kw_only=True)
class SDQResult(SearchResult):
    """A finished SDQ search: the :class:`SearchResult` plus the bits it chose and how the budget
    was met."""

    bits: dict[str, int]
    start_cost: float
    min_cost: float
    steps: int
    forced: list[str]
    settings: SDQSettings
    model: nn.Module | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "steps": self.steps, "forced": len(self.forced)}

    def rows(self) -> list[dict[str, Any]]:
        return [{**r, "searched": r["layer"] in self.bits} for r in super().rows()]

    def table(self) -> str:
        head = format_table(self.rows(), [*LAYER_COLUMNS, "searched"])
        t = self.cost.totals()
        return (f"{head}\nbudget {self.budget.describe()}: achieved "
                f"{self.budget.describe(self.achieved)} in {self.steps} steps"
                f"{f' ({len(self.forced)} forced step-downs)' if self.forced else ''}; "
                f"average weight bits {t['avg_weight_bits']:.3f}, "
                f"GBitOPs {t['bitops'] / 1e9:.4f}, weights {t['size_bytes'] / 1024:.1f} KiB")

    def to_dict(self) -> dict[str, Any]:
        return dict(
            method=self.method, budget=self.budget.model_dump(mode="json"),
            achieved=self.achieved, met=self.met, start_cost=self.start_cost,
            min_cost=self.min_cost, steps=self.steps, forced=self.forced, bits=self.bits,
            settings=self.settings.model_dump(mode="json"), cost=self.cost.totals(),
            layers=self.rows(), history=self.history, config=self.config.to_dict(),
        )


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


@register_search("sdq", settings=SDQSettings)
def sdq_search(
    model: nn.Module,
    data: Iterable,
    budget: Budget | str | float,
    example_inputs,
    settings: SDQSettings | None = None,
    *,
    progress: bool = True,
    output_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    hooks: Sequence[TrainHook] = (),
    model_name: str | None = None,
    dist_ctx=None,
    **overrides: Any,
) -> SDQResult:
    """Search per-layer weight bits for float ``model`` on ``(input, target)`` batches.

    ``data`` is any sized iterable of training batches, cycled as needed; ``example_inputs``
    fixes the execution order and the per-sample cost. ``overrides`` set :class:`SDQSettings`
    fields. The steps run on the shared QAT :class:`~lowbit.qat.Trainer`: with ``output_dir``
    it checkpoints there after every pass over ``data`` and ``resume=True`` continues from it;
    ``hooks`` add further trainer plug-ins (e.g. distillation during the search).
    """
    if not isinstance(budget, Budget):
        budget = Budget.parse(budget)
    if settings is None:
        settings = validate_model(SDQSettings, overrides, "SDQ settings")
    elif overrides:
        settings = validate_model(SDQSettings, {**settings.model_dump(), **overrides}, "SDQ settings")
    torch.manual_seed(settings.seed)
    if dist_ctx is not None:
        model = model.to(dist_ctx.device)
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
    cost = ExpectedCost([q for _, q in searched], const, coef, budget, settings.cost_weight)
    rule = StepDown(searched, cost, cost_of, settings)
    trainer = Trainer(
        qmodel, data, _train_config(settings, data, progress, output_dir, settings.loss),
        hooks=[as_hook(cost), rule, *hooks], output_dir=output_dir, dist_ctx=dist_ctx,
        reseed=False, run_info={
            "model": model_name or type(model).__name__, "method": "sdq-search",
            "budget": budget.model_dump(mode="json"),
            "search": settings.model_dump(mode="json"), "quant": cfg.to_dict()},
    )
    trainer.fit(resume=resume)
    forced = [] if rule.met else rule.force()
    qmodel.eval()
    for _, q in searched:
        q.searching = False
    bits = {n: q.bits for n, q in searched}
    predicted = cost_of(list(bits.values()))
    config = final_config(settings, bits)
    report = measure(prepare(model, config, example_inputs), example_inputs)
    achieved = budget.measure(report)
    if not budget.met_by(achieved) or abs(achieved - predicted) > 1e-6 * max(1.0, abs(achieved)):
        raise TrainingError(
            f"internal check failed: the found config measures {budget.describe(achieved)}, "
            f"predicted {budget.describe(predicted)}, budget {budget.describe()}; please report"
        )
    return SDQResult(config, report, rule.history, budget, "sdq", bits=bits, start_cost=start,
                     min_cost=lowest, steps=trainer.global_step, forced=forced,
                     settings=settings, model=qmodel)


def _train_config(settings: SDQSettings, data, progress: bool, output_dir,
                  loss: str = "ce") -> TrainConfig:
    """The trainer options of a search: Adam without decay at constant learning rates, one
    "epoch" per pass over ``data`` (cycled up to ``steps``), health checks at every check."""
    try:
        per_pass = len(data)  # type: ignore[arg-type]
    except TypeError:
        per_pass = settings.steps
    if per_pass == 0:
        raise DataError("the training data is empty: pass at least one (input, target) batch")
    return TrainConfig(
        epochs=math.ceil(settings.steps / per_pass), max_steps_per_epoch=per_pass,
        optimizer="adam", lr=settings.lr, quant_lr=settings.quant_lr, weight_decay=0.0,
        schedule="constant", channels_last=False, log_every=settings.check_every,
        logger="csv" if output_dir is not None else "none", seed=settings.seed,
        progress=progress, loss=loss,
    )


__all__ = [
    "SDQResult", "SDQSettings", "check_budget", "final_config", "sdq_search", "search_config",
]
