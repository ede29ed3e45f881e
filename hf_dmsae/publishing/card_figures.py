"""The figures a distilled core's model card shows (PNG, matplotlib): its cycles' coverage curves and the carry-over
between cycles (the paper's Fig. 2). Every other figure is a report's (`reporting.figures`, which draws with `save`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..model.core import DMSAECore  # noqa: E402


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def coverage_curves(cores: list[DMSAECore], tau: float, path: Path) -> Path:
    """Share of the pool's attribution covered by the top-i latents, one curve per cycle, with τ and each core."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for t, core in enumerate(cores):
        curve = core.coverage_curve.tolist()
        axis.plot(range(1, len(curve) + 1), curve, label=f"cycle {t} (|C|={len(core)})")
        axis.axvline(len(core), color=axis.lines[-1].get_color(), linestyle=":", linewidth=1)
    axis.axhline(tau, color="grey", linestyle="--", linewidth=1, label=f"τ = {tau}")
    axis.set(xlabel="latents, by descending attribution score", ylabel="coverage", xscale="log", ylim=(0, 1.02))
    axis.legend(fontsize=8)
    return save(figure, path)


def carry_over(rows: list[dict], path: Path) -> Path:
    """Fig. 2: each cycle's core size and how many of its latents were already in the previous core."""
    figure, axis = plt.subplots(figsize=(6, 4))
    cycles = [r["cycle"] for r in rows]
    axis.bar(cycles, [r["size"] for r in rows], color="lightsteelblue", label="core size")
    axis.bar(cycles, [r["kept"] for r in rows], color="steelblue", label="carried over from the previous core")
    axis.set(xlabel="cycle", ylabel="latents", xticks=cycles)
    axis.legend(fontsize=8)
    return save(figure, path)
