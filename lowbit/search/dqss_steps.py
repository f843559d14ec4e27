"""The two ways DQSS trains its architecture parameters: per reconstruction unit (PTQ) and as a
plug-in of the shared QAT trainer.

Both follow one schedule (:class:`ArchSchedule`): for the first ``warmup`` fraction of the steps
the logits stay at zero, so the network weights (QAT) and every candidate's own parameters
settle under the uniform mixture before they are compared; then the logits learn and the
softmax temperature falls geometrically from ``temperature`` to ``final_temperature``, so the
mixture is nearly one-hot when the argmax is taken (a smaller gap between the searched and the
discrete model). ``final_temperature == temperature`` turns the annealing off, ``warmup=0`` the
warm-up.

PTQ: :func:`search_units` walks the calibration set through the reconstruction units
(:func:`lowbit.ptq.blocks.walk_units`, the cache of block reconstruction). At each unit the
logits and the candidates' parameters learn to reproduce the float unit's output (weights
frozen); then each mixture keeps one candidate, chosen by the discrete unit's error starting
from the argmax (:func:`_choose`), and the chosen quantizers go on learning alone for
``finetune_iters`` steps; later units then see the discrete earlier ones.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..nn.layers import QuantLayerMixin
from ..prepare import set_mode
from ..ptq.blocks import find_units, run_chunked, trace_units, walk_units
from ..ptq.reconstruct import output_error
from ..qat.hooks import StepContext, TrainHook
from ..quant.mixture import MixtureQuantizer

N_EVAL = 256  # calibration images on which each unit's error is reported


class ArchSchedule:
    """Warm-up, then geometric temperature annealing, as a pure function of the step."""

    def __init__(self, total: int, warmup: float, temperature: float, final_temperature: float):
        self.total = max(1, total)
        self.warm = int(warmup * self.total)
        self.t0, self.t1 = temperature, final_temperature

    def frozen(self, step: int) -> bool:
        return step < self.warm

    def temperature(self, step: int) -> float:
        if step <= self.warm:
            return self.t0
        frac = min(1.0, (step - self.warm) / max(1, self.total - self.warm))
        return self.t0 * (self.t1 / self.t0) ** frac

    def apply(self, mixes: Sequence[MixtureQuantizer], step: int) -> None:
        frozen, t = self.frozen(step), self.temperature(step)
        for m in mixes:
            m.logits.requires_grad_(not frozen)
            m.set_temperature(t)


def mixtures(module: nn.Module) -> list[MixtureQuantizer]:
    return [m for m in module.modules() if isinstance(m, MixtureQuantizer)]


def slots(module: nn.Module) -> list[tuple[str, str, str, MixtureQuantizer]]:
    """``(layer name relative to module, slot, side, mixture)`` of every mixture in a layer."""
    out = []
    for name, layer in module.named_modules():
        if isinstance(layer, QuantLayerMixin):
            for slot, side in (("weight_quant", "weight"), ("input_quant", "act")):
                mix = getattr(layer, slot)
                if isinstance(mix, MixtureQuantizer):
                    out.append((name, slot, side, mix))
    return out


def collapse(module: nn.Module) -> dict[str, dict[str, str]]:
    """Replace every mixture of ``module``'s layers by its chosen candidate (``choice`` where
    set, else the argmax); returns the choices by layer name (relative to ``module``) and slot
    (``weight`` / ``act``)."""
    chosen: dict[str, dict[str, str]] = {}
    for name, slot, side, mix in slots(module):
        i = mix.choice if mix.choice is not None else mix.argmax()
        chosen.setdefault(name, {})[side] = mix.names[i]
        setattr(module.get_submodule(name) if name else module, slot, mix.candidates[i])
    return chosen


def snapshot(mixes: Sequence[MixtureQuantizer]) -> list[list[float]]:
    """Each mixture's ``softmax(logits)`` (temperature 1, so runs with different schedules
    compare; the argmax is the same at any temperature), one sync for all."""
    if not mixes:
        return []
    flat = torch.cat([torch.softmax(m.logits.detach(), 0) for m in mixes]).tolist()
    out, i = [], 0
    for m in mixes:
        out.append(flat[i:i + len(m.names)])
        i += len(m.names)
    return out


def _candidate_params(mixes: Sequence[MixtureQuantizer]) -> list[nn.Parameter]:
    return [p for m in mixes for c in m.candidates for p in c.parameters() if p.requires_grad]


def _train_unit(unit: nn.Module, q_args: tuple, target: torch.Tensor, params, arch, iters: int,
                settings: Any, gen: torch.Generator, schedule: ArchSchedule | None) -> None:
    """Adam on ``params`` (and the logits ``arch``) for ``iters`` steps; weights frozen."""
    if iters == 0 or not (params or arch):
        return
    own = {id(p) for p in params} | {id(p) for p in arch}
    frozen = [p for p in unit.parameters() if p.requires_grad and id(p) not in own]
    for p in frozen:
        p.requires_grad_(False)
    groups = [g for g in ({"params": params, "lr": settings.quant_lr},
                          {"params": arch, "lr": settings.arch_lr}) if g["params"]]
    opt = torch.optim.Adam(groups)
    mixes = mixtures(unit)
    n = target.shape[0]
    bs = min(settings.batch_size, n)
    try:
        for it in range(iters):
            if schedule is not None:
                schedule.apply(mixes, it)
            idx = torch.randint(0, n, (bs,), generator=gen).to(target.device)
            args = tuple(a[idx] if isinstance(a, torch.Tensor) and a.shape[:1] == (n,) else a
                         for a in q_args)
            loss = output_error(unit(*args), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)


@torch.no_grad()
def _error(unit: nn.Module, q_args: tuple, target: torch.Tensor, chunk: int) -> torch.Tensor:
    n = target.shape[0]
    m = min(n, N_EVAL)
    sub = tuple(a[:m] if isinstance(a, torch.Tensor) and a.shape[:1] == (n,) else a
                for a in q_args)
    return output_error(run_chunked(unit, sub, {}, m, chunk), target[:m])


def _candidate_states(mixes: Sequence[MixtureQuantizer]) -> list[list[dict]]:
    return [[copy.deepcopy(c.state_dict()) for c in m.candidates] for m in mixes]


def _choose(unit: nn.Module, calibrated: list[list[dict]], q_args: tuple, target: torch.Tensor,
            chunk: int, sweeps: int, errs: dict) -> tuple[str, list[dict]]:
    """The discrete-aware choice: which candidate each mixture keeps, and whether the chosen
    quantizers keep their searched parameters (trained inside the mixture, next to the others)
    or go back to their calibrated ones, by the error of the *discrete* unit.

    It starts from the argmax with the better of the two parameter sets (``errs``: ``discrete``
    and ``calibrated``), then greedy coordinate descent: ``sweeps`` times over the mixtures in
    order, each tries its other candidates (the rest fixed, both parameter sets, for the unit
    as a whole) and keeps one only if the unit's error is strictly lower, so the result is never
    worse than the argmax and is deterministic. Sets each mixture's ``choice`` and loads the
    kept parameters; returns the parameter set and the mixtures changed from the argmax.
    """
    mixes = mixtures(unit)  # the order of ``calibrated``
    where = {id(m): (name, side) for name, _, side, m in slots(unit)}
    searched = _candidate_states(mixes)
    states = {"discrete": searched, "calibrated": calibrated}

    def error(picks: list[int], start: str) -> torch.Tensor:
        for k, (m, i) in enumerate(zip(mixes, picks, strict=True)):
            m.choice = i
            m.candidates[i].load_state_dict(states[start][k][i])
        return _error(unit, q_args, target, chunk)

    picks = [m.argmax() for m in mixes]
    errs["discrete"] = error(picks, "discrete")
    errs["calibrated"] = error(picks, "calibrated")
    start = "calibrated" if bool(errs["calibrated"] < errs["discrete"]) else "discrete"
    best = errs[start]
    for _ in range(sweeps):
        moved = False
        for k, m in enumerate(mixes):
            for i in range(len(m.names)):
                if i == picks[k]:
                    continue
                trial = picks[:k] + [i] + picks[k + 1:]
                for s in ("discrete", "calibrated"):
                    e = error(trial, s)
                    if bool(e < best):
                        best, start, picks, moved = e, s, trial, True
        if not moved:
            break
    errs["chosen"] = error(picks, start)
    changed = [dict(layer=where[id(m)][0], side=where[id(m)][1], argmax=m.names[m.argmax()],
                    chosen=m.names[i]) for m, i in zip(mixes, picks, strict=True)
               if i != m.argmax()]
    return start, changed


def search_units(qmodel: nn.Module, x: torch.Tensor, settings: Any,
                 progress: bool = True) -> tuple[dict[str, dict[str, str]], list[dict]]:
    """DQSS-PTQ on a calibrated ``qmodel`` holding mixtures, in place (see the module docstring).

    Returns the choices by layer and one history record per unit: the unit's error at the
    uniform start, of the searched mixture, of the argmax unit with searched (``discrete``) and
    calibrated parameters, of the discrete-aware choice (``chosen``) and after the fine-tune
    (``final``); which parameters the fine-tune started from, the mixtures whose choice differs
    from the argmax, the probabilities and the time.
    """
    units = find_units(qmodel)
    graph = trace_units(qmodel, units)
    fp_model = set_mode(copy.deepcopy(qmodel), "float").eval()
    qmodel.eval()
    gen = torch.Generator().manual_seed(settings.seed)
    chunk = settings.chunk
    choices: dict[str, dict[str, str]] = {}
    history: list[dict] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(units), desc="dqss units", disable=not progress, leave=False)

    def on_unit(name: str, q_args: tuple, fp_out: torch.Tensor) -> None:
        t0 = time.perf_counter()
        unit = qmodel.get_submodule(name)
        mixes = mixtures(unit)
        calibrated = _candidate_states(mixes)
        errs = {"start": _error(unit, q_args, fp_out, chunk)}
        schedule = ArchSchedule(settings.iters, settings.warmup, settings.temperature,
                                settings.final_temperature)
        arch = [m.logits for m in mixes if len(m.names) > 1]
        _train_unit(unit, q_args, fp_out, _candidate_params(mixes), arch, settings.iters,
                    settings, gen, schedule)
        errs["searched"] = _error(unit, q_args, fp_out, chunk)
        probs = snapshot(mixes)
        kept, changed = _choose(unit, calibrated, q_args, fp_out, chunk, settings.choice_sweeps,
                                errs)
        params = [p for m in mixes for p in m.chosen().parameters() if p.requires_grad]
        picked = collapse(unit)
        before = copy.deepcopy(unit.state_dict())
        _train_unit(unit, q_args, fp_out, params, [], settings.finetune_iters, settings, gen, None)
        errs["final"] = _error(unit, q_args, fp_out, chunk)
        if bool(errs["final"] > errs["chosen"]):  # a short fine-tune can end above its start
            unit.load_state_dict(before)
            errs["final"] = errs["chosen"]
        values = dict(zip(errs, torch.stack(list(errs.values())).tolist(), strict=True))
        for c in changed:
            c["layer"] = f"{name}.{c['layer']}" if c["layer"] else name
        for layer, sides in picked.items():
            choices[f"{name}.{layer}" if layer else name] = sides
        history.append(dict(unit=name, **{f"error_{k}": v for k, v in values.items()},
                            finetune_from=kept, changed=changed, probabilities=probs,
                            seconds=time.perf_counter() - t0))
        bar.update(1)

    try:
        walk_units(graph, units, fp_model, qmodel, x, on_unit, chunk=chunk)
    finally:
        bar.close()
    return choices, history


class ArchHook(TrainHook):
    """DQSS-QAT as a trainer plug-in: the logits get their own Adam group (``arch_lr``), follow
    :class:`ArchSchedule`, and are recorded every ``check_every`` steps; the run stops at
    ``steps``. Weights, candidates and logits move in the same forward-backward pass."""

    name = "dqss"

    def __init__(self, mixes: Sequence[MixtureQuantizer], settings: Any):
        self.mixes = list(mixes)
        self.settings = settings
        self.schedule = ArchSchedule(settings.steps, settings.warmup, settings.temperature,
                                     settings.final_temperature)
        self.history: list[dict[str, Any]] = []
        self.trainer = None

    def param_groups(self, model) -> list[dict[str, Any]]:
        arch = [m.logits for m in self.mixes if len(m.names) > 1]
        return [dict(params=arch, lr=self.settings.arch_lr, name="arch")] if arch else []

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer
        self.schedule.apply(self.mixes, trainer.global_step)

    def on_step_end(self, ctx: StepContext) -> None:
        step = ctx.step + 1
        self.schedule.apply(self.mixes, step)
        last = step >= self.settings.steps
        if step % self.settings.check_every == 0 or last:
            self.history.append(dict(step=step, temperature=self.schedule.temperature(step),
                                     probabilities=snapshot(self.mixes)))
        if last:
            self.trainer.stop()

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


__all__ = ["ArchHook", "ArchSchedule", "collapse", "mixtures", "search_units", "slots", "snapshot"]
