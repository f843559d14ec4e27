"""The SDQ search as plug-ins of the shared QAT trainer.

:class:`ExpectedCost` is a loss plug-in (``term(model, inputs, outputs, targets)``): the
differentiable cost of the current bitwidth distribution, relative to the budget. :class:`StepDown`
is a step hook: it gives the DBPs their own learning rate, keeps them in [0, 1], and every
``check_every`` steps steps settled layers down one bit, grows the cost weight while the budget
is not met, and stops the trainer once it is (or at the step limit). Its state (cost weight,
history, running sums) travels in the trainer's checkpoint, so an interrupted search resumes
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import TrainingError
from ..qat.hooks import StepContext, TrainHook
from ..quant.sdq import SDQQuantizer
from .budget import Budget


class ExpectedCost:
    """``weight * (const + sum(coef * (b - p))) / budget``: exact in expectation, because every
    budget kind is linear in the per-layer bits. ``expected`` keeps the last cost (detached)."""

    name = "cost"

    def __init__(self, quantizers: Sequence[SDQQuantizer], const: float, coef: Sequence[float],
                 budget: Budget, weight: float):
        self.quantizers = list(quantizers)
        self.const = const
        self.coef_list = [float(c) for c in coef]
        self.coef = torch.tensor(list(coef), dtype=torch.float32,
                                 device=self.quantizers[0].dbp.device)
        self.budget = budget
        self.weight = weight
        self.expected: torch.Tensor | None = None
        self.term: torch.Tensor | None = None

    def __call__(self, model, inputs, outputs, targets) -> torch.Tensor:
        bits = torch.stack([q.expected_bits() for q in self.quantizers])
        expected = self.const + (self.coef * bits).sum()
        self.expected = expected.detach()
        self.term = self.weight * expected / self.budget.value
        return self.term


class StepDown(TrainHook):
    """The step-down rule of the SDQ search (see the module docstring); ``forced`` lists the
    layers :meth:`force` had to step down after the step limit."""

    name = "sdq"

    def __init__(self, searched: Sequence[tuple[str, SDQQuantizer]], cost: ExpectedCost,
                 cost_of: Callable[[list[int]], float], settings: Any):
        self.searched = list(searched)
        self.cost = cost
        self.cost_of = cost_of
        self.settings = settings
        self.history: list[dict[str, Any]] = []
        self.met = False
        self.since = 0
        dev = cost.coef.device
        self.loss_sum = torch.zeros((), device=dev)
        self.task_sum = torch.zeros((), device=dev)
        self.trainer = None

    @property
    def budget(self) -> Budget:
        return self.cost.budget

    def bits(self) -> list[int]:
        return [q.bits for _, q in self.searched]

    def param_groups(self, model) -> list[dict[str, Any]]:
        return [dict(params=[q.dbp for _, q in self.searched], lr=self.settings.dbp_lr,
                     name="dbp")]

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, ctx: StepContext) -> None:
        with torch.no_grad():
            for _, q in self.searched:
                q.dbp.clamp_(0.0, 1.0)
        self.loss_sum += ctx.loss.detach() + self.cost.term.detach()
        self.task_sum += ctx.loss.detach()
        self.since += 1
        step = ctx.step + 1
        last = step == self.settings.steps
        if step % self.settings.check_every and not last:
            return
        self.met = self._check(step, self.loss_sum / self.since, self.task_sum / self.since)
        self.history[-1]["cost_weight"] = self.cost.weight
        self.cost.weight *= self.settings.cost_growth
        self.loss_sum.zero_()
        self.task_sum.zero_()
        self.since = 0
        if self.met or last:
            self.trainer.stop()

    def _check(self, step: int, loss_mean: torch.Tensor, task_mean: torch.Tensor) -> bool:
        """Step down settled layers (most settled first) while the budget is not met."""
        n = len(self.searched)
        probs = torch.cat([q.dbp.detach() for _, q in self.searched] +
                          [torch.stack([loss_mean, task_mean, self.cost.expected])]).tolist()
        p, (loss, task, exp_cost) = probs[:n], probs[n:]
        if not all(math.isfinite(v) for v in probs):
            raise TrainingError(
                f"the search loss or a DBP became NaN/Inf by step {step}; lower lr, quant_lr or "
                "dbp_lr (--lr, --quant-lr, --dbp-lr), or check the data for NaN"
            )
        cost = self.cost_of(self.bits())
        for i in sorted(range(n), key=lambda i: -p[i]):
            if self.budget.met_by(cost) or p[i] < self.settings.threshold:
                break
            q = self.searched[i][1]
            if q.can_step_down:
                q.step_down()
                self.trainer.optimizer.state.pop(q.dbp, None)
                cost = self.cost_of(self.bits())
        self.history.append(dict(step=step, loss=loss, task_loss=task, expected_cost=exp_cost,
                                 cost=cost, bits=self.bits(), dbp=p))
        return self.budget.met_by(cost)

    def force(self) -> list[str]:
        """Greedy finish when the step limit came first: if one step-down meets the budget, the
        one that overshoots least; otherwise the most settled DBP (then the largest cost)."""
        coef = self.cost.coef_list
        forced = []
        p = torch.cat([q.dbp.detach() for _, q in self.searched]).tolist()
        while not self.budget.met_by(cost := self.cost_of(self.bits())):
            movable = [i for i, (_, q) in enumerate(self.searched) if q.can_step_down]
            enough = [j for j in movable if self.budget.met_by(cost - coef[j])]
            if enough:
                i = min(enough, key=lambda j: coef[j])
            else:
                i = max(movable, key=lambda j: (p[j], coef[j]))
            self.searched[i][1].step_down()
            p[i] = self.searched[i][1].init_dbp
            forced.append(self.searched[i][0])
        return forced

    def state_dict(self) -> dict[str, Any]:
        return dict(cost_weight=self.cost.weight, history=self.history, met=self.met,
                    since=self.since, loss_sum=self.loss_sum.cpu(), task_sum=self.task_sum.cpu())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cost.weight = float(state["cost_weight"])
        self.history = list(state["history"])
        self.met = bool(state["met"])
        self.since = int(state["since"])
        self.loss_sum = state["loss_sum"].to(self.loss_sum.device)
        self.task_sum = state["task_sum"].to(self.task_sum.device)
