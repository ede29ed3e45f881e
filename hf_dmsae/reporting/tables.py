"""The cells and tables of every report: markdown rows from formatted cells, and a value over seeds as mean ± std."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """The lines of a markdown table; each cell is written with `str`, so numbers come formatted."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def mean_and_spread(value) -> tuple[float, float]:
    """A number, or the mean and sample standard deviation of a list of them (one per seed; one value: spread 0;
    none: not a number)."""
    if not isinstance(value, list):
        return value, 0.0
    if not value:
        return float("nan"), 0.0
    return statistics.fmean(value), statistics.stdev(value) if len(value) > 1 else 0.0


def spread_cell(values: list[float], digits: int = 3) -> str:
    """A cell for values over seeds: `mean ± std`, the value alone for one seed, `–` for none."""
    if not values:
        return "–"
    mean, spread = mean_and_spread(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"
