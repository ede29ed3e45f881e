"""The cells and tables of every report: markdown rows from formatted cells, and a value over seeds as mean ± std."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..run.variants import VARIANTS

NAN = float("nan")


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


T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
"""Student's t 0.975 quantile at 1 … 15 degrees of freedom (beyond, 1.96 is within 8 %)."""
LOWER_IS_BETTER = ("fvu", "dead_fraction")
OPEN_DIRECTION = ("sb_meta_fve",)
"""Metrics whose better direction is lower, and whose direction is left open (SAEBench's meta-SAE FVE)."""


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """The 95 % t-interval of the mean of `values` (one per seed; None for fewer than two)."""
    if len(values) < 2:
        return None
    mean, spread = mean_and_spread(values)
    degrees = len(values) - 1
    half = (T_975[degrees - 1] if degrees <= len(T_975) else 1.96) * spread / math.sqrt(len(values))
    return mean - half, mean + half


def difference_cell(values: list[float], metric: str, digits: int = 3) -> str:
    """A paired difference over seeds: `mean ± std [95 % t-interval] (n)`, and `win` or `loss` by the metric's
    better direction only where the interval excludes 0 (`≠ 0` where the direction is open); `–` for none."""
    if not values:
        return "–"
    cell = f"{spread_cell(values, digits)}"
    interval = t_interval(values)
    if interval is not None:
        low, high = interval
        cell += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
        if low > 0 or high < 0:
            if metric in OPEN_DIRECTION:
                cell += " ≠ 0"
            else:
                cell += " win" if (high < 0) == (metric in LOWER_IS_BETTER) else " loss"
    return f"{cell} ({len(values)})"


def write_report(folder: Path, lines: list[str]) -> str:
    """Write `<folder>/report.md` from its lines and return its text."""
    text = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(text)
    return text


def figure_lines(folder: Path) -> list[str]:
    """The markdown images of every figure in `<folder>/figures/`."""
    return [f"![{p.stem}](figures/{p.name})" for p in sorted((folder / "figures").glob("*.png"))]


def repo_lines(folder: Path) -> list[str]:
    """A line per repo folder in `<folder>/repos/`: its repo id and where it is."""
    return [f"- `{p.name.replace('__', '/')}`: `{p}`" for p in sorted((folder / "repos").iterdir())]


def matched_table(matched: dict, title: str = "Each variant − the Matryoshka SAE at the same measured L0") -> list[str]:
    deltas = list(dict.fromkeys(m for rows in matched.values() for row in rows.values() for m in row if m != "l0"))
    rows = []
    for variant in sorted(matched, key=VARIANTS.index):
        for k, row in sorted(matched[variant].items(), key=lambda item: int(item[0][1:])):
            cells = [difference_cell(row.get(m) or [], m) for m in deltas]
            rows.append([k[1:], variant, spread_cell(row["l0"], 1), *cells])
    return [
        "",
        f"## {title}",
        "",
        "The Matryoshka SAE's value at a model's measured global L0 is read off the same seed's Matryoshka curve "
        "(its models at every k), linear in log L0; outside that curve's L0 range there is no difference. Each cell: "
        "mean ± std of the paired differences, their 95 % t-interval, `win` or `loss` only where it excludes 0, and "
        "in brackets the seeds whose curve spans the model's L0 (for n = 3 the interval's half-width is 2.48 × std). "
        "FVU and dead fraction: lower is better; the others: higher is better"
        + (
            ", but for sb_meta_fve (the share of the decoder's variance a meta-SAE explains: how composed of shared "
            "parts the latents are), whose better direction SAEBench leaves open."
            if "sb_meta_fve" in deltas
            else "."
        ),
        "",
        *markdown_table(["k", "variant", "measured L0", *(f"Δ {m}" for m in deltas)], rows),
    ]


def latent_matches_tables(matches: dict) -> list[str]:
    """Claim 2's tables, core and non-core latents apart, from `evaluation.consistency.latent_matches`."""
    smallest, at, cos = matches["from_k"], matches["at_k"], matches["match_cos"]
    larger = list(next(iter(matches["variants"].values()))["same_seed"])
    header = [f"k{smallest}→{k[1:]} same seed" for k in larger] + [f"k{smallest} at its init"]
    header += [f"k{smallest}→{k[1:]} other seed" for k in larger] + [f"across seeds (k {at})"]
    lines = [
        "",
        "## Claim 2: the same latents across sparsities and seeds",
        "",
        f"The share of a model's latents whose decoder direction has a match (cosine ≥ {cos}) in another model: the "
        f"k-{smallest} model in the same seed's models at larger k, in its own initialization (which a seed's models "
        "share: a latent still there is matched across sparsities without having learnt anything, so the first "
        f"columns are inflated by as much), in the other seeds' models at larger k, and at k {at}, each seed's model "
        "in every other seed's. Mean ± std over seeds (same seed, init) or ordered pairs of seeds (other seed, across "
        "seeds).",
    ]
    for part, title in (("core", "Core latents"), ("noncore", "Non-core latents")):
        rows = []
        for variant, row in matches["variants"].items():
            columns = [*row["same_seed"].values(), row["initial"], *row["other_seeds"].values(), row["across_seeds"]]
            shares = [[v for v in column[part] if v is not None] for column in columns]
            if any(shares):
                rows.append([variant, *(spread_cell(s) for s in shares)])
        lines += ["", f"{title}:", "", *markdown_table(["variant", *header], rows)]
    return lines
