"""What every benchmark's report and figures are made of.

Markdown tables and the formatting of a summary over seeds; strict JSON; and for figures the
headless pyplot, one line style per optimizer, a seed band, a grid of panels, and saving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common.contenders import CONTENDERS

# --- Text ---------------------------------------------------------------------------------------


def markdown_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1, right: str = "--:"
) -> str:
    """A Markdown table whose first `left` columns are left-aligned, the others right-aligned."""
    rule = "|" + "---|" * left + f"{right}|" * (len(header) - left)
    return "\n".join([markdown_row(header), rule, *(markdown_row(cells) for cells in rows)])


def fmt_summary(summary: dict[str, Any], metric: str) -> str:
    """Mean ± standard deviation over seeds (a percentage for accuracies), or how many diverged."""
    if not summary["finite"]:
        finite = sum(v is not None and math.isfinite(v) for v in summary["per_seed"])
        return f"diverged ({len(summary['per_seed']) - finite} of {len(summary['per_seed'])} seeds)"
    if metric.endswith("accuracy"):
        return f"{summary['mean']:.2%} ± {summary['std']:.2%}"
    return f"{summary['mean']:.3g} ± {summary['std']:.2g}"


def json_safe(tree: Any) -> Any:
    """Plain lists, dicts and numbers; NaN and infinity (diverged, never reached) become None."""
    if isinstance(tree, dict):
        return {key: json_safe(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [json_safe(value) for value in tree]
    if isinstance(tree, np.generic):
        tree = tree.item()
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


# --- Figures ------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures render without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def panel_grid(count: int, width: float, height: float):
    """A figure of `count` panels, at most three a row; the panels left over are hidden."""
    columns = min(3, count)
    rows = math.ceil(count / columns)
    fig, axes = pyplot().subplots(
        rows,
        columns,
        figsize=(width * columns, height * rows),
        constrained_layout=True,
        squeeze=False,
    )
    for ax in axes.flat[count:]:
        ax.set_axis_off()
    return fig, axes


def style(name: str) -> dict[str, Any]:
    """A colour per optimizer of the registry (else black); optim_zoo's solid, others dashed."""
    names = [contender.name for contender in CONTENDERS]
    color = f"C{names.index(name)}" if name in names else "k"
    return {"color": color, "linestyle": "-" if name.startswith("optim_zoo.") else "--"}


def band(ax, row: dict[str, Any], metric: str, label: str | None = None, scale: float = 1.0):
    """A row's mean curve of `metric` over seeds, with the band from their min to their max."""
    steps = np.asarray(row["curves"]["step"])
    curve = row["curves"][metric]
    line_style = style(row["optimizer"])
    mean = np.asarray(curve["mean"], np.float64) * scale  # null (diverged) becomes NaN
    ax.plot(steps, mean, label=label or row["optimizer"], **line_style)
    ax.fill_between(
        steps,
        np.asarray(curve["min"], np.float64) * scale,
        np.asarray(curve["max"], np.float64) * scale,
        color=line_style["color"],
        alpha=0.15,
        linewidth=0,
    )


def accuracy_floor(final_accuracies: Iterable[float | None]) -> float:
    """The bottom of an accuracy axis: just below the lowest final accuracy, at most 0.8."""
    finite = [a for a in final_accuracies if a is not None and math.isfinite(a)]
    return max(0.0, min(0.8, min(finite, default=0.0) - 0.05))
