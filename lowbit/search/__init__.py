"""Searches over quantization configs: mixed precision toward a typed budget (SDQ) and each
layer's quantization strategy at given bits (DQSS).

Searches are registered by name (:func:`register_search`) and return a :class:`SearchResult`,
which is all the Pareto sweep, the CLI and the recipes read.
"""

from .budget import Budget, BudgetKind
from .dqss import DQSSResult, DQSSSettings, dqss_search
from .pareto import ParetoResult, RetrainScorer, pareto_front, pareto_sweep
from .registry import SearchMethod, get_search, register_search, run_search, search_names
from .result import SearchResult
from .sdq import SDQResult, SDQSettings, sdq_search

__all__ = [
    "Budget",
    "BudgetKind",
    "DQSSResult",
    "DQSSSettings",
    "ParetoResult",
    "RetrainScorer",
    "SDQResult",
    "SDQSettings",
    "SearchMethod",
    "SearchResult",
    "dqss_search",
    "get_search",
    "pareto_front",
    "pareto_sweep",
    "register_search",
    "run_search",
    "sdq_search",
    "search_names",
]
