"""DQSS: differentiable search of each layer's quantization strategy (Li, Yan, Chen, 2024).

Bits are fixed; what each searched layer chooses is *which quantizer* its weight and its input
use, among candidate strategies (:mod:`lowbit.quant.mixture`: ``minmax``, ``mse``, ``lsq``,
``qil``, ``pot``, ``pact``, ...). Every searched weight and input quantizer becomes a
:class:`~lowbit.quant.mixture.MixtureQuantizer`; the architecture parameters (alpha for
weights, beta for inputs) and every candidate's own parameters train together, in one of two
modes:

* ``ptq``: on calibration data only, unit by unit over the block-reconstruction cache
  (:func:`lowbit.search.dqss_steps.search_units`), weights frozen;
* ``qat``: on the shared QAT trainer, weights, candidates and logits in one forward-backward
  pass per step (:class:`lowbit.search.dqss_steps.ArchHook`).

Both warm up before the logits move and anneal the softmax temperature (docs/dqss.md says why
and how to turn either off). The result is one strategy per layer (QAT: the argmax; PTQ: the argmax
or one strategy for the whole unit, whichever fine-tunes to the lower error) as a plain config: one
exact-name rule per searched layer naming its weight and input ``kind`` and ``observer``,
on top of the base config (``base_config`` may be another search's result, e.g. SDQ's per-layer
bits, whose bits are kept). Re-apply it with ``lowbit qat --config`` or ``lowbit ptq --config``
(a calibration method: ``mse``/``minmax``/``percentile``; rapq/brecq replace every kind).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..config import EdgePolicy, LayerRule, QuantConfig, validate_model
from ..cost.model import measure
from ..errors import ConfigError
from ..prepare import calibrate, prepare, quant_layers
from ..qat.hooks import TrainHook
from ..qat.trainer import Trainer
from ..quant.base import check_bits
from ..quant.mixture import MixtureQuantizer, mixture_like, strategy_fields
from ..quant.registry import quantizer_class
from ..report.tables import format_table
from ..utils import atomic_write_text
from .dqss_steps import ArchHook, collapse, mixtures, search_units, snapshot
from .registry import register_search
from .result import SearchResult
from .sdq import _train_config

W_CANDIDATES = {"ptq": ["minmax", "mse", "lsq", "qil"], "qat": ["minmax", "mse", "lsq", "pact"]}
A_CANDIDATES = ["percentile", "mse", "lsq", "pact"]


class DQSSSettings(BaseModel):
    """Every option of the DQSS search (the CLI flags map onto these fields)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["ptq", "qat"] = Field("ptq", description="calibration data only, or training")
    w_bits: int = Field(4, description="weight bits of every searched layer")
    a_bits: int | None = Field(4, description="activation bits (None: float activations)")
    w_candidates: list[str] | None = Field(
        None, description="weight strategies (None: minmax, mse, lsq and qil for ptq; pact in "
        "place of qil for qat, whose Adam steps collapse QIL intervals of narrow channels)")
    a_candidates: list[str] = Field(default_factory=lambda: list(A_CANDIDATES))
    observer: str = Field("mse", description="observer of kind-only strategies and fixed layers")
    per_channel: bool = True
    first_last: EdgePolicy = Field(
        EdgePolicy.INT8, description="first/last layer: 8bit or float (not searched), same (searched)")
    base_config: str | None = Field(
        None, description="a config file to search on (its per-layer bits, e.g. SDQ's, are kept; "
        "w_bits, a_bits, per_channel and first_last then come from it)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature at the start")
    final_temperature: float = Field(0.1, gt=0, description="temperature at the end of the search")
    warmup: float = Field(0.2, ge=0, lt=1, description="fraction of steps before alpha/beta move")
    arch_lr: float = Field(0.05, gt=0, description="Adam learning rate of alpha/beta")
    quant_lr: float = Field(1e-3, gt=0, description="Adam learning rate of candidates' parameters")
    # ptq
    iters: int = Field(200, ge=0, description="ptq: search steps per reconstruction unit")
    finetune_iters: int = Field(
        100, ge=0, description="ptq: steps per unit for the chosen quantizers after the choice")
    compare_iters: int = Field(
        25, ge=0, description="ptq: fine-tune steps after which the options are compared (the "
        "winner goes on to finetune_iters); 0 compares after the whole fine-tune")
    choose_by: Literal["argmax", "finetuned"] = Field(
        "finetuned", description="ptq: the discrete choice per unit: the argmax, or the lowest "
        "error after the fine-tune among the argmax and each strategy in all the unit's layers")
    batch_size: int = Field(32, ge=1, description="ptq: images per step")
    num_batches: int | None = Field(None, ge=1, description="ptq: calibration batches (None: all)")
    chunk: int = Field(64, ge=1, description="ptq: images per forward pass of the cache")
    # qat
    steps: int = Field(2000, ge=1, description="qat: search steps")
    lr: float = Field(1e-4, gt=0, description="qat: Adam learning rate of weights and biases")
    calib_batches: int = Field(8, ge=1, description="qat: batches initialising the candidates")
    check_every: int = Field(50, ge=1, description="qat: steps between recorded alpha/beta")
    finetune_steps: int = Field(
        0, ge=0, description="qat: training steps of the discrete model after the argmax")
    loss: str = Field("ce", description="qat: task loss of the training steps (ce for "
                      "classifiers, l1 or l2 for super-resolution: no labels needed)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DQSSSettings:
        if self.w_candidates is None:
            self.w_candidates = list(W_CANDIDATES[self.mode])
        check_bits(self.w_bits)
        if self.a_bits is not None:
            check_bits(self.a_bits)
        for side, names in (("w_candidates", self.w_candidates),
                            ("a_candidates", self.a_candidates)):
            if not names:
                raise ConfigError(f"{side} is empty: give at least one strategy, e.g. "
                                  f"{W_CANDIDATES[self.mode] if side[0] == 'w' else A_CANDIDATES}")
            if len(set(names)) != len(names):
                raise ConfigError(f"{side} names a strategy twice: {names}")
            for n in names:
                kind = strategy_fields(n, self.observer)["kind"]
                if side == "w_candidates" and self.base_config is None:
                    try:
                        check_bits(self.w_bits, True, quantizer_class(kind))
                    except ConfigError as e:
                        raise ConfigError(f"weight candidate {n!r} cannot represent "
                                          f"{self.w_bits} bits: {e}") from None
        return self


def base_config(settings: DQSSSettings) -> QuantConfig:
    """The config the search starts from: ``base_config`` when given, else the uniform one of the
    settings (``observer``-calibrated uniform for ptq, LSQ for qat) with symmetric activation
    grids, which every candidate kind shares (PACT and QIL have no offset grid)."""
    if settings.base_config is not None:
        return QuantConfig.load(settings.base_config)
    cfg = QuantConfig.uniform(
        settings.w_bits, settings.a_bits, kind="uniform" if settings.mode == "ptq" else "lsq",
        observer=settings.observer, per_channel=settings.per_channel,
        first_last=settings.first_last)
    if cfg.act is not None:
        cfg = cfg.model_copy(update={"act": cfg.act.model_copy(update={"symmetric": True})})
    return cfg


def final_config(base: QuantConfig, choices: dict[str, dict[str, str]],
                 observer: str) -> QuantConfig:
    """``base`` plus one exact-name rule per searched layer naming the chosen strategies."""
    rules = []
    for name, sides in choices.items():
        kw = {side: strategy_fields(s, observer) for side, s in sides.items()}
        rules.append(LayerRule(match=name, **kw))
    return base.model_copy(update={"layers": [*base.layers, *rules]})


def searchable(qmodel: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """Quantized layers the search may change: all but a first/last layer the policy fixes."""
    report = qmodel.lowbit_report
    fixed = set()
    if config.first_layer is not EdgePolicy.SAME:
        fixed.add(report.first_layer)
    if config.last_layer is not EdgePolicy.SAME:
        fixed.add(report.last_layer)
    found = [(n, layer) for n, layer in quant_layers(qmodel) if n not in fixed]
    if not found:
        raise ConfigError(
            "no layer is left to search: the model has no quantizable conv/linear layers besides "
            "the first/last ones; use first_last='same' to search those too")
    return found


def add_mixtures(layers: Sequence[tuple[str, nn.Module]], settings: DQSSSettings) -> None:
    """Put a mixture of the candidate strategies in every quantizer slot of ``layers``."""
    for name, layer in layers:
        for slot, names in (("weight_quant", settings.w_candidates),
                            ("input_quant", settings.a_candidates)):
            q = getattr(layer, slot)
            if q is None:
                continue
            try:
                mix = mixture_like(q, names, settings.observer,
                                   temperature=settings.temperature)
            except ConfigError as e:
                raise ConfigError(f"layer {name} ({slot}): {e}") from None
            setattr(layer, slot, mix)


@dataclass(kw_only=True)
class DQSSResult(SearchResult):
    """A finished DQSS search: the chosen strategy per searched layer and side, the final
    ``softmax(logits)`` of every mixture, and the searched model with the choices in place
    (``model``: after PTQ, ready to evaluate; after QAT, to retrain with the config)."""

    choices: dict[str, dict[str, str]]
    probabilities: dict[str, dict[str, list[float]]]
    settings: DQSSSettings
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for r in self.cost.layers:
            c, p = self.choices.get(r.name, {}), self.probabilities.get(r.name, {})
            row = dict(layer=r.name, w_bits=r.w_bits, a_bits=r.a_bits)
            for side, names in (("weight", self.settings.w_candidates),
                                ("act", self.settings.a_candidates)):
                row[side] = c.get(side, "-")  # the choice, not always the largest probability
                row[f"p_{side}"] = (p[side][names.index(c[side])] if side in p and side in c
                                    else 1.0)
            out.append(row)
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """How many layers chose each strategy, per side."""
        out: dict[str, dict[str, int]] = {"weight": {}, "act": {}}
        for sides in self.choices.values():
            for side, s in sides.items():
                out[side][s] = out[side].get(s, 0) + 1
        return out

    def table(self) -> str:
        cols = ["layer", "w_bits", "a_bits", "weight", "p_weight", "act", "p_act"]
        counts = "; ".join(f"{side}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                           for side, c in self.counts().items() if c)
        return (f"{format_table(self.rows(), cols)}\nDQSS-{self.settings.mode} chose ({counts}) "
                f"in {self.seconds:.1f} s; p_* = softmax(alpha/beta) of the chosen strategy")

    def to_dict(self) -> dict[str, Any]:
        return dict(method=self.method, settings=self.settings.model_dump(mode="json"),
                    choices=self.choices, probabilities=self.probabilities,
                    candidates={"weight": self.settings.w_candidates,
                                "act": self.settings.a_candidates},
                    seconds=self.seconds, cost=self.cost.totals(), layers=self.rows(),
                    history=self.history, config=self.config.to_dict())

    def save(self, directory: str | Path, plot: bool | None = None) -> dict[str, Path]:
        """Write ``config.yaml``, ``search.json``, ``strategy.txt`` and ``strategy.png``."""
        import json

        from .plots import have_matplotlib, plot_strategies

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = {"config": self.config.save(directory / "config.yaml")}
        out["json"] = directory / "search.json"
        atomic_write_text(out["json"], json.dumps(self.to_dict(), indent=2) + "\n")
        out["table"] = directory / "strategy.txt"
        atomic_write_text(out["table"], self.table() + "\n")
        if plot or (plot is None and have_matplotlib()):
            names = list(self.choices)
            out["plot"] = plot_strategies(
                names, {"weight": self.settings.w_candidates, "act": self.settings.a_candidates},
                self.probabilities, self.choices, directory / "strategy.png",
                f"DQSS-{self.settings.mode}: chosen strategy per layer, final softmax(alpha/beta)")
        return out


@register_search("dqss", settings=DQSSSettings)
def dqss_search(
    model: nn.Module,
    data: Iterable,
    budget=None,
    example_inputs=None,
    settings: DQSSSettings | None = None,
    *,
    progress: bool = True,
    output_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    hooks: Sequence[TrainHook] = (),
    model_name: str | None = None,
    dist_ctx=None,
    **overrides: Any,
) -> DQSSResult:
    """Search the quantization strategy of every layer of float ``model`` (see the module
    docstring). ``data``: calibration batches (ptq) or ``(input, target)`` training batches
    (qat, cycled up to ``steps``); ``example_inputs`` fixes the execution order. DQSS has no
    budget (bits are given), so ``budget`` must be None. ``output_dir``/``resume``/``hooks``
    apply to the qat mode, as for SDQ."""
    if budget is not None:
        raise ConfigError("DQSS chooses each layer's quantizer at given bits and takes no budget; "
                          "set the bits with w_bits/a_bits (or base_config, e.g. SDQ's result)")
    if settings is None:
        settings = validate_model(DQSSSettings, overrides, "DQSS settings")
    elif overrides:
        settings = validate_model(DQSSSettings, {**settings.model_dump(), **overrides}, "DQSS settings")
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    base = base_config(settings)
    if settings.mode == "ptq":
        from ..ptq.rapq import gather_inputs

        x = gather_inputs(data, settings.num_batches)
        example_inputs = example_inputs if example_inputs is not None else x[:2]
    if dist_ctx is not None:
        model = model.to(dist_ctx.device)
    qmodel = prepare(model, base, example_inputs)
    layers = searchable(qmodel, base)
    add_mixtures(layers, settings)
    if settings.mode == "ptq":
        x = x.to(next(qmodel.parameters()).device)
        calibrate(qmodel, [x[i:i + settings.chunk] for i in range(0, x.shape[0], settings.chunk)],
                  progress=progress)
        mixes = {n: _sides(layer) for n, layer in layers}
        choices, history = search_units(qmodel, x, settings, progress)
    else:
        calibrate(qmodel, data, num_batches=settings.calib_batches, progress=progress)
        rule = ArchHook(mixtures(qmodel), settings)
        trainer = Trainer(
            qmodel, data, _train_config(settings, data, progress, output_dir, settings.loss),
            hooks=[rule, *hooks], output_dir=output_dir, dist_ctx=dist_ctx, reseed=False,
            run_info={"model": model_name or type(model).__name__, "method": "dqss-search",
                      "search": settings.model_dump(mode="json"), "quant": base.to_dict()})
        trainer.fit(resume=resume)
        qmodel.eval()
        mixes = {n: _sides(layer) for n, layer in layers}
        choices, history = collapse(qmodel), rule.history
        if settings.finetune_steps:
            tune = settings.model_copy(update={"steps": settings.finetune_steps})
            Trainer(qmodel, data, _train_config(tune, data, progress, None, tune.loss),
                    hooks=[StopAt(tune.steps), *hooks], dist_ctx=dist_ctx, reseed=False).fit()
            qmodel.eval()
    probabilities = {n: dict(zip(sides, snapshot(list(sides.values())), strict=True))
                     for n, sides in mixes.items()}
    config = final_config(base, choices, settings.observer)
    report = measure(prepare(model, config, example_inputs), example_inputs)
    return DQSSResult(config, report, history, None, "dqss", choices=choices,
                      probabilities=probabilities, settings=settings,
                      seconds=time.perf_counter() - t0, model=qmodel)


class StopAt(TrainHook):
    """Ends a trainer run after ``steps`` steps (epochs are whole passes over the data)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.trainer = None

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, ctx) -> None:
        if ctx.step + 1 >= self.steps:
            self.trainer.stop()


def _sides(layer: nn.Module) -> dict[str, Any]:
    """The layer's mixtures by side (read before the choice replaces them)."""
    out = {}
    for slot, side in (("weight_quant", "weight"), ("input_quant", "act")):
        q = getattr(layer, slot)
        if isinstance(q, MixtureQuantizer):
            out[side] = q
    return out


__all__ = ["DQSSResult", "DQSSSettings", "base_config", "dqss_search", "final_config"]
