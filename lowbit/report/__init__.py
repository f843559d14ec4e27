"""Results: JSON files and plain-text/markdown tables."""

from .tables import format_table, write_json

__all__ = ["format_table", "write_json"]
