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
frozen); then the chosen quantizers go on learning alone, for the argmax and for each strategy
taken throughout the unit. After ``compare_iters`` of those steps the option with the lowest
error wins and only it goes on to ``finetune_iters`` (with its optimizer, so one option alone
runs exactly as an uninterrupted fine-tune): comparing early costs a fraction of fine-tuning
every option to the end. The unit keeps the lowest-error state of its start, the comparison
and the end. Later units then see the discrete earlier ones.
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
                settings: Any, gen: torch.Generator, schedule: ArchSchedule | None,
                opt: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer | None:
    """Adam on ``params`` (and the logits ``arch``) for ``iters`` steps; weights frozen.
    Returns the optimizer, so that ``opt=`` continues a run where it stopped."""
    if iters == 0 or not (params or arch):
        return opt
    own = {id(p) for p in params} | {id(p) for p in arch}
    frozen = [p for p in unit.parameters() if p.requires_grad and id(p) not in own]
    for p in frozen:
        p.requires_grad_(False)
    if opt is None:
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
    return opt


@torch.no_grad()
def _error(unit: nn.Module, q_args: tuple, target: torch.Tensor, chunk: int) -> torch.Tensor:
    n = target.shape[0]
    m = min(n, N_EVAL)
    sub = tuple(a[:m] if isinstance(a, torch.Tensor) and a.shape[:1] == (n,) else a
                for a in q_args)
    return output_error(run_chunked(unit, sub, {}, m, chunk), target[:m])


def _candidate_states(mixes: Sequence[MixtureQuantizer]) -> list[list[dict]]:
    return [[copy.deepcopy(c.state_dict()) for c in m.candidates] for m in mixes]


def _start(unit: nn.Module, mixes: Sequence[MixtureQuantizer], picks: Sequence[int],
           states: dict[str, list[list[dict]]], q_args: tuple, target: torch.Tensor, chunk: int,
           errs: dict) -> str:
    """Put candidate ``picks[k]`` in mixture ``k`` and load its searched (``discrete``) or
    calibrated parameters, whichever gives the discrete unit the lower error (both in ``errs``).
    The searched ones were trained inside the mixture, next to the others, and may not be the
    best when the candidate is alone."""
    def error(start: str) -> torch.Tensor:
        for k, (m, i) in enumerate(zip(mixes, picks, strict=True)):
            m.choice = i
            m.candidates[i].load_state_dict(states[start][k][i])
        return _error(unit, q_args, target, chunk)

    errs["discrete"], errs["calibrated"] = error("discrete"), error("calibrated")
    if bool(errs["calibrated"] < errs["discrete"]):
        return "calibrated"
    error("discrete")
    return "discrete"


def _options(mixes: Sequence[MixtureQuantizer]) -> dict[str, list[int]]:
    """The discrete units compared: the argmax, then each strategy in every mixture that has it
    (the others keep their argmax), without repeats; one candidate each: the argmax only."""
    argmax = [m.argmax() for m in mixes]
    out = {"argmax": argmax}
    for name in dict.fromkeys(n for m in mixes for n in m.names):
        picks = [m.names.index(name) if name in m.names else a for m, a in zip(mixes, argmax,
                                                                                 strict=True)]
        if picks not in out.values():
            out[name] = picks
    return out


def search_units(qmodel: nn.Module, x: torch.Tensor, settings: Any,
                 progress: bool = True) -> tuple[dict[str, dict[str, str]], list[dict]]:
    """DQSS-PTQ on a calibrated ``qmodel`` holding mixtures, in place (see the module docstring).

    Each unit's choice (``choose_by="finetuned"``): the argmax, and each strategy put in every
    mixture of the unit that has it, are each fine-tuned from the searched state on the same
    batches for ``compare_iters`` steps; the lowest error then wins (the argmax on a tie) and
    alone finishes the fine-tune. With one candidate per mixture this is the argmax alone, so
    single strategies run the same pipeline.

    Returns the choices by layer and one history record per unit: the unit's error at the
    uniform start, of the searched mixture, of the argmax unit with searched (``discrete``) and
    calibrated parameters and when the options are compared (``argmax``), of the choice after
    its whole fine-tune (``final``); the option chosen, its start (``finetune_from``), every
    option's error when compared (``options``), the mixtures whose choice differs from the
    argmax, the probabilities, the time.
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
        where = {id(m): (f"{name}.{n}" if n else name, side) for n, _, side, m in slots(unit)}
        states = {"discrete": _candidate_states(mixes), "calibrated": calibrated}
        options = _options(mixes) if settings.choose_by == "finetuned" else {
            "argmax": [m.argmax() for m in mixes]}
        searched_unit, gen_state = copy.deepcopy(unit.state_dict()), gen.get_state()
        total = settings.finetune_iters
        first = min(settings.compare_iters or total, total)
        compared, best = {}, None
        for option, picks in options.items():  # each from the searched state, same batches
            unit.load_state_dict(searched_unit)
            gen.set_state(gen_state)
            e: dict[str, torch.Tensor] = {}
            kept = _start(unit, mixes, picks, states, q_args, fp_out, chunk, e)
            params = [p for m in mixes for p in m.chosen().parameters() if p.requires_grad]
            before = copy.deepcopy(unit.state_dict())
            opt = _train_unit(unit, q_args, fp_out, params, [], first, settings, gen, None)
            e["compared"] = _error(unit, q_args, fp_out, chunk)
            compared[option] = e["compared"]
            if option == "argmax":
                errs.update(discrete=e["discrete"], calibrated=e["calibrated"],
                            argmax=e["compared"])
            if best is None or bool(e["compared"] < best[2]["compared"]):
                best = (option, picks, e, kept, copy.deepcopy(unit.state_dict()), gen.get_state(),
                        params, opt, before)
        option, picks, e, kept, state, after, params, opt, before = best
        unit.load_state_dict(state)
        gen.set_state(after)
        for m, i in zip(mixes, picks, strict=True):
            m.choice = i
        _train_unit(unit, q_args, fp_out, params, [], total - first, settings, gen, None, opt)
        # a fine-tune can end above where it was when compared, or above its start: the unit
        # keeps the best of the three states, as block reconstruction keeps its best candidate
        e["final"] = _error(unit, q_args, fp_out, chunk) if total > first else e["compared"]
        for err, earlier in ((e["compared"], state), (e[kept], before)):
            if bool(e["final"] > err):
                unit.load_state_dict(earlier)
                e["final"] = err
        errs["final"] = e["final"]
        changed = [dict(layer=where[id(m)][0], side=where[id(m)][1], argmax=m.names[m.argmax()],
                        chosen=m.names[i]) for m, i in zip(mixes, picks, strict=True)
                   if i != m.argmax()]
        picked = collapse(unit)
        values = dict(zip(errs, torch.stack(list(errs.values())).tolist(), strict=True))
        for layer, sides in picked.items():
            choices[f"{name}.{layer}" if layer else name] = sides
        history.append(dict(unit=name, **{f"error_{k}": v for k, v in values.items()},
                            choice=option, finetune_from=kept, changed=changed,
                            options=dict(zip(compared, torch.stack(list(compared.values())).tolist(),
                                             strict=True)), probabilities=probs,
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
