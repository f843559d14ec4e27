"""Mixed-precision search: each method returns a lowbit config that meets a typed budget."""

from .budget import Budget, BudgetKind
from .pareto import ParetoResult, RetrainScorer, pareto_front, pareto_sweep
from .sdq import SDQResult, SDQSettings, sdq_search

__all__ = [
    "Budget",
    "BudgetKind",
    "ParetoResult",
    "RetrainScorer",
    "SDQResult",
    "SDQSettings",
    "pareto_front",
    "pareto_sweep",
    "sdq_search",
]
