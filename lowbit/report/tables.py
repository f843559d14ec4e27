"""Tables and JSON result files written the same way by the CLI, the demo and benchmarks."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], markdown: bool = False) -> str:
    """Align ``rows`` (dicts) under ``columns``; floats get two decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    if markdown:
        line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(columns), sep] + [line(r) for r in cells])
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def environment() -> dict[str, str]:
    import torch

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": str(torch.get_num_threads()),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a results file atomically, with the software environment recorded."""
    path = Path(path)
    data = {"environment": environment(), **payload}
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path
