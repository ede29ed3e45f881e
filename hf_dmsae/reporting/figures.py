"""The reports' figures from a run's records (PNG, matplotlib): `l0_core` over training for the distilled core and the
controls (Fig. 3), the selected core's convergence within a cycle, metrics against k (Fig. 4), and the synthetic
benchmark's selection scores and prefix FVU curves. The model card's (coverage curves, Fig. 2's carry-over) are
`publishing.card_figures`', drawn with the same `save` on the same headless backend."""

from __future__ import annotations

from pathlib import Path

from matplotlib import ticker

from ..publishing.card_figures import plt, save  # pyplot on the headless backend
from .tables import mean_and_spread


def l0_core_curves(control: dict[str, dict], path: Path) -> Path:
    """Fig. 3: mean active core latents per token over training, one line per core kind (mean over seeds, the band
    spanning the seeds)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    draw_l0_core(axis, list(control.values()))
    return save(figure, path)


_CORE_COLOURS = {"distilled": "C0", "random_init": "C1", "random_trained": "C2", "random_off_top": "C3"}


def draw_l0_core(axis, runs: list[dict], share: bool = False, style: str = "-") -> None:
    """Onto `axis`: each core kind's `l0_core_curve` (`[[step, E[L0 core]], …]`) over training, the mean over its
    runs with a band spanning them; `share` divides by the core's size (`core_size`)."""
    for kind in sorted({r["core"] for r in runs}):
        chosen = [r for r in runs if r["core"] == kind and r["l0_core_curve"]]
        if not chosen:
            continue
        length = min(len(r["l0_core_curve"]) for r in chosen)
        steps = [step for step, _ in chosen[0]["l0_core_curve"][:length]]
        values = [[v / (r["core_size"] if share else 1) for _, v in r["l0_core_curve"][:length]] for r in chosen]
        mean = [sum(col) / len(col) for col in zip(*values, strict=False)]
        line = axis.plot(
            steps,
            mean,
            style,
            marker="o" if style == "-" else None,
            markersize=3,
            color=_CORE_COLOURS.get(kind),
            label=f"{kind} core ({len(chosen)} seeds)",
        )[0]
        axis.fill_between(
            steps,
            [min(col) for col in zip(*values, strict=False)],
            [max(col) for col in zip(*values, strict=False)],
            color=line.get_color(),
            alpha=0.2,
        )
    axis.set(
        xlabel="training step", ylabel="E[L0 core] / |C|" if share else "E[L0 core]", ylim=(0, 1.02 if share else None)
    )
    axis.legend(fontsize=8)


COUNTINGS = {
    "l0_core_positive": "core latents > 0, / |C|",
    "l0_core_above_threshold": "core latents > inference threshold, / |C|",
    "core_energy_share": "core's share of the reconstruction's energy",
}
"""Fig. 3's possible countings (`evaluation.core_usage`) and their axis labels."""


def core_countings(runs: list[dict], path: Path) -> Path:
    """Fig. 3 counted three ways over training (`core_usage_curve` of each run), one panel per counting, one line
    per core kind (mean over its runs, the band spanning them)."""
    figure, axes = plt.subplots(1, len(COUNTINGS), figsize=(4.4 * len(COUNTINGS), 3.6), squeeze=False)
    for axis, (counting, label) in zip(axes[0], COUNTINGS.items(), strict=True):
        size = (lambda r: r["core_size"]) if counting.startswith("l0") else (lambda r: 1)
        curves = [
            {
                "core": r["core"],
                "core_size": size(r),
                "l0_core_curve": [(e["step"], e[counting]) for e in r["core_usage_curve"] if counting in e],
            }
            for r in runs
        ]
        draw_l0_core(axis, curves, share=True)
        axis.set_ylabel(label, fontsize=8)
    return save(figure, path)


def selection_convergence(tracks: dict[int, list[dict]], finals: dict[int, set], path: Path) -> Path:
    """Within each cycle: the Jaccard overlap of the core selected from the model at each tracked step with the
    cycle's final core, and the selection's size."""
    figure, (overlap_axis, size_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for cycle, track in sorted(tracks.items()):
        final = finals[cycle]
        steps = [entry["step"] for entry in track]
        overlaps = [len(set(e["ids"]) & final) / len(set(e["ids"]) | final) for e in track]
        overlap_axis.plot(steps, overlaps, marker="o", markersize=3, label=f"cycle {cycle}")
        size_axis.plot(steps, [e["selection_size"] for e in track], marker="o", markersize=3, label=f"cycle {cycle}")
        size_axis.axhline(len(final), color=size_axis.lines[-1].get_color(), linestyle=":", linewidth=1)
    overlap_axis.set(xlabel="training step", ylabel="Jaccard overlap with the final core", ylim=(0, 1.02))
    size_axis.set(xlabel="training step", ylabel="selected core size (dotted: final)")
    overlap_axis.legend(fontsize=8)
    return save(figure, path)


def metrics_against_k(results: list[dict], metrics: tuple[str, ...], path: Path) -> Path:
    """Fig. 4: each metric against target k, one line per variant (dense core, sparse core, Matryoshka); a metric
    given as a list (one value per seed) is drawn as its mean with ± one standard deviation."""
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=False):
        _draw_against(axis, results, "k", metric)
        ks = sorted({r["k"] for r in results})
        axis.set(xlabel="k", ylabel=metric, xscale="log")
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.minorticks_off()
    axes[0][0].legend(fontsize=8)
    return save(figure, path)


def metrics_against_l0(results: list[dict], metrics: tuple[str, ...], path: Path) -> Path:
    """Each metric against the measured global L0 (mean ± std over seeds on both axes), one line per variant:
    variants compared at equal sparsity, not at equal k."""
    columns = min(4, len(metrics))
    rows = -(-len(metrics) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.4 * rows), squeeze=False)
    for axis, metric in zip(axes.flat, metrics, strict=False):
        _draw_against(axis, results, "l0", metric)
        axis.set(xlabel="measured L0", ylabel=metric, xscale="log")
        axis.xaxis.set_major_locator(ticker.LogLocator(base=2))  # L0s span powers of two: label those, plainly
        axis.xaxis.set_major_formatter(ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
    for axis in list(axes.flat)[len(metrics) :]:
        axis.set_visible(False)
    axes[0][0].legend(fontsize=7)
    return save(figure, path)


def _draw_against(axis, results: list[dict], x: str, metric: str) -> None:
    for variant in sorted({r["variant"] for r in results}):
        chosen = [r for r in results if r["variant"] == variant and metric in r]
        points = sorted((*mean_and_spread(r[x]), *mean_and_spread(r[metric])) for r in chosen)
        spread_x = [sx for _, sx, _, _ in points]
        axis.errorbar(
            [mean for mean, _, _, _ in points],
            [m for _, _, m, _ in points],
            xerr=spread_x if any(spread_x) else None,
            yerr=[s for _, _, _, s in points],
            marker="o",
            capsize=3,
            label=variant,
        )


def selection_against_truth(
    runs: dict[tuple[str, str], list[dict]], cores: list[str], selections: tuple[str, ...], path: Path
) -> Path:
    """Precision and recall of each core against the ground truth's useful features, one bar per selection method
    (mean over seeds, ± one standard deviation)."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(selections)
    for axis, metric in zip(axes, ("precision", "recall"), strict=True):
        for i, selection in enumerate(selections):
            spread = [mean_and_spread([r[metric] for r in runs[core, selection]]) for core in cores]
            axis.bar(
                [c + (i - (len(selections) - 1) / 2) * width for c in range(len(cores))],
                [m for m, _ in spread],
                width,
                yerr=[s for _, s in spread],
                capsize=2,
                label=selection,
            )
        axis.set(
            xticks=range(len(cores)), xticklabels=cores, ylabel=f"{metric} against the useful features", ylim=(0, 1.02)
        )
    axes[0].legend(fontsize=8)
    return save(figure, path)


def prefix_fvu_curves(runs: list[dict], path: Path) -> Path:
    """Progressive coding: FVU of the first G latents against G, one line per model and latent order (mean over
    seeds, ± one standard deviation)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    prefixes = runs[0]["prefixes"]
    for name in runs[0]["fvu"]:
        spread = [mean_and_spread([r["fvu"][name][i] for r in runs]) for i in range(len(prefixes))]
        axis.errorbar(prefixes, [m for m, _ in spread], yerr=[s for _, s in spread], marker="o", capsize=3, label=name)
    axis.set(xlabel="G (first latents kept)", ylabel="FVU", xticks=prefixes)
    axis.legend(fontsize=8)
    return save(figure, path)


def r_precision_against_properties(
    properties: dict[str, list], attribution: list, random: list, relation: dict, path: Path
) -> Path:
    """One panel per world property: attribution's (filled) and random ranking's (hollow) R-precision, one point per
    world, with Spearman's ρ of attribution's in the title."""
    figure, axes = plt.subplots(1, len(properties), figsize=(4 * len(properties), 3.6), sharey=True)
    for axis, (name, values) in zip(axes, properties.items(), strict=True):
        points = [(x, a, r) for x, a, r in zip(values, attribution, random, strict=True) if x is not None]
        axis.scatter(
            [x for x, a, _ in points if a is not None], [a for _, a, _ in points if a is not None], label="GxA"
        )
        axis.scatter(
            [x for x, _, r in points if r is not None],
            [r for _, _, r in points if r is not None],
            facecolors="none",
            edgecolors="grey",
            label="random",
        )
        rho = relation[name]["r_precision"]
        axis.set(xlabel=name.replace("_", " "), title=f"ρ = {rho:.2f}" if rho is not None else "ρ: too few worlds")
    axes[0].set_ylabel("R-precision of the cycle-0 pool ranking")
    axes[0].legend(fontsize=8)
    return save(figure, path)


def convergence_curves(models: dict[str, dict], path: Path) -> Path:
    """Held-out FVU and the share of latents near their initialisation against optimiser steps, one curve per
    setting, a column per variant (the screening models: `models` of one k and seed)."""
    variants = sorted({m["variant"] for m in models.values()})
    figure, axes = plt.subplots(2, len(variants), figsize=(5 * len(variants), 7), squeeze=False)
    for column, variant in enumerate(variants):
        for model in (m for m in models.values() if m["variant"] == variant):
            curve = model["convergence"]["curve"]
            steps = [point["step"] for point in curve]
            for row, measured in enumerate(("heldout_fvu", "share_near_init")):
                axes[row][column].plot(steps, [point[measured] for point in curve], marker=".", label=model["setting"])
        axes[0][column].set(title=variant, ylabel="held-out FVU", xscale="log")
        axes[1][column].set(xlabel="optimiser steps", ylabel="share of latents near init", xscale="log")
    axes[0][0].legend(fontsize=7)
    return save(figure, path)
