"""Searches by name: ``@register_search("sdq", settings=SDQSettings)`` on a function

    search(model, data, budget, example_inputs, settings=None, *, progress=True,
           output_dir=None, resume=False, hooks=(), **overrides) -> SearchResult

so the CLI, the recipes and the Pareto sweep run any registered search the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from .result import SearchResult


@dataclass(frozen=True)
class SearchMethod:
    """A registered search: its function and the pydantic class of its settings."""

    name: str
    fn: Callable[..., SearchResult]
    settings: type | None = None


_SEARCHES: dict[str, SearchMethod] = {}


def register_search(name: str, *, settings: type | None = None):
    """Decorator registering ``fn`` as search ``name`` (a name is registered once)."""

    def deco(fn: Callable[..., SearchResult]) -> Callable[..., SearchResult]:
        if name in _SEARCHES and _SEARCHES[name].fn is not fn:
            raise ConfigError(f"a search named {name!r} is already registered; pick another name")
        _SEARCHES[name] = SearchMethod(name, fn, settings)
        return fn

    return deco


def search_names() -> list[str]:
    return sorted(_SEARCHES)


def get_search(name: str) -> SearchMethod:
    try:
        return _SEARCHES[name]
    except KeyError:
        raise ConfigError(
            f"unknown search method {name!r}; registered: {', '.join(search_names())}"
        ) from None


def run_search(name: str, *args, **kwargs) -> SearchResult:
    """Run search ``name`` and check it kept the contract (a :class:`SearchResult`)."""
    result = get_search(name).fn(*args, **kwargs)
    if not isinstance(result, SearchResult):
        raise ConfigError(
            f"search {name!r} returned {type(result).__name__}, not a SearchResult; a registered "
            "search must return lowbit.search.SearchResult (or a subclass)"
        )
    return result
