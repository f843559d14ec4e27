"""PNG plots of search results; matplotlib is optional (``pip install 'lowbit[plot]'``).

Figures are drawn with ``matplotlib.figure.Figure`` directly, so no pyplot backend is switched
and nothing global changes in the caller's process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import LowbitError


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LowbitError(
            "plots need matplotlib: pip install 'lowbit[plot]' (or matplotlib), or turn plots "
            "off (--no-plot on the command line, plot=False in Python)"
        ) from None
    return Figure(figsize=(width, height), dpi=120)


def plot_bits(names: Sequence[str], bits: Sequence[int], path: str | Path, title: str = "") -> Path:
    """Bar chart of weight bits per layer, in execution order."""
    fig = _figure(max(4.5, 0.35 * len(names) + 1.5), 3.8)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), bits, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("weight bits")
    ax.set_ylim(0, max(bits, default=8) + 1)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_strategies(
    names: Sequence[str],
    candidates: dict[str, Sequence[str]],
    probabilities: dict[str, dict[str, Sequence[float]]],
    choices: dict[str, dict[str, str]],
    path: str | Path,
    title: str = "",
) -> Path:
    """One heat map per side (weight, act): the final mixing probability of every candidate
    (rows) in every searched layer (columns, execution order), the chosen one boxed."""
    sides = [s for s in ("weight", "act") if any(s in c for c in choices.values())]
    fig = _figure(max(4.5, 0.35 * len(names) + 2.0), 1.0 + 1.6 * len(sides)
                  + 0.25 * sum(len(candidates[s]) for s in sides))
    axes = fig.subplots(len(sides), 1, squeeze=False)[:, 0]
    for ax, side in zip(axes, sides, strict=True):
        cands = list(candidates[side])
        grid = [[probabilities.get(n, {}).get(side, [float("nan")] * len(cands))[i]
                 for n in names] for i in range(len(cands))]
        im = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="Blues")
        for j, n in enumerate(names):
            pick = choices.get(n, {}).get(side)
            if pick in cands:
                i = cands.index(pick)
                ax.add_patch(_box(j, i))
        ax.set_yticks(range(len(cands)), cands, fontsize=7)
        ax.set_xticks(range(len(names)), names if ax is axes[-1] else [""] * len(names),
                      rotation=75, ha="right", fontsize=7)
        ax.set_ylabel(side, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _box(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="tab:red", linewidth=1.5)


def plot_pareto(
    points: Sequence[tuple[float, float, str]],
    front: Sequence[tuple[float, float]],
    path: str | Path,
    title: str = "",
    baselines: Sequence[tuple[float, float, str]] = (),
    series: str = "search",
) -> Path:
    """Accuracy vs GBitOPs: every point labelled, the Pareto front joined by a line;
    ``series`` names the searched points in the legend (the search method)."""
    fig = _figure(5.5, 4.0)
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", label=series)
    for x, y, label in points:
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if front:
        xs, ys = zip(*sorted(front), strict=True)
        ax.plot(xs, ys, color="tab:blue", alpha=0.6)
    for i, (x, y, label) in enumerate(baselines):
        ax.scatter([x], [y], marker="x", color="tab:red", label="baselines" if i == 0 else None)
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("GBitOPs per sample")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
