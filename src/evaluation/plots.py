"""What every report, comparison and figure shares: the matplotlib backend, number formatting, rate bars.

The backend is set here, once, before pyplot is imported: every module that draws imports ``plt`` from here, so
figures render without a display whichever module is imported first.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["fmt", "is_measured", "nothing_measured", "plt", "rate_bars"]


def fmt(x: Any, none: str = "None") -> str:
    """A figure in a markdown table: floats to 4 decimals, NaN (nothing to measure it on) as ``n/a``, None as
    ``none``, anything else as text."""
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4f}"
    return none if x is None else str(x)


def is_measured(value: Any) -> bool:
    """A number, not None (the report lacks it) nor NaN (nothing to measure it on)."""
    return isinstance(value, int | float) and not math.isnan(value)


def rate_bars(
    ax: Any,
    xs: list[float],
    values: list[float | None],
    cis: list[list[float] | None],
    width: float = 0.8,
    **style: Any,
) -> bool:
    """Bars at ``xs`` with their 95% intervals (``cis``: [low, high] or None) as error bars and each value written
    above its bar. A value not measured (None: the report lacks it; NaN: no answer got a verdict) gets no bar but
    the words "not measured", never a bar at 0. Returns whether any value was measured."""
    heights = [v if is_measured(v) else float("nan") for v in values]
    spans = [c if is_measured(v) and c and all(map(is_measured, c)) else None for v, c in zip(values, cis, strict=True)]
    # clipped at 0: a rate of 1.0 can sit a rounding error above its interval's upper end (1 - 1e-16)
    low = [max(0.0, v - c[0]) if c else 0.0 for v, c in zip(heights, spans, strict=True)]
    high = [max(0.0, c[1] - v) if c else 0.0 for v, c in zip(heights, spans, strict=True)]
    ax.bar(xs, heights, width, yerr=[low, high], capsize=3, **style)
    for x, v, c in zip(xs, heights, spans, strict=True):
        if math.isnan(v):
            ax.text(x, 0.02, "not measured", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgray")
        else:  # above the interval, so the error bar does not cross the label
            ax.text(x, max(v, c[1] if c else v) + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    return not all(math.isnan(v) for v in heights)


def nothing_measured(ax: Any) -> None:
    """Say across an empty panel that it is empty because nothing was measured, not because every rate is 0."""
    ax.text(0.5, 0.6, "nothing measured", transform=ax.transAxes, ha="center", fontsize=10, color="dimgray")
