"""The core-dynamics study's report (its `results.json`): curves, ablations, geometry, countings."""

from __future__ import annotations

from pathlib import Path

from ..run.results import (
    CORE_DYNAMICS_RESULTS,
    RESULTS_REMEDY,
)
from ..utils.integrity import read_json
from . import figures
from .convergence import converged_cell, unconverged_warning
from .tables import NAN, markdown_table, spread_cell, write_report


def _dynamics_summary(runs: list[dict]) -> dict[str, str]:
    """Cells over the runs of one setting (one per seed): E[L0 core] share at its minimum and at the end, held-out
    FVU and L0s, the geometry at the end."""
    cored = [r for r in runs if r["core_size"]]
    share = {r["seed"]: [v / r["core_size"] for _, v in r["l0_core_curve"]] or [NAN] for r in cored}
    cells = {
        "seeds": str(len(runs)),
        "min": spread_cell([min(s) for s in share.values()]),
        "end": spread_cell([s[-1] for s in share.values()]),
        "eval_l0_core": spread_cell([r["metrics"]["eval_l0_core"] for r in cored], 1),
        "eval_l0_noncore": spread_cell([r["metrics"]["eval_l0_noncore"] for r in runs], 1),
        "eval_fvu": spread_cell([r["metrics"]["eval_fvu"] for r in runs]),
    }
    for key in ("firing", "mean_preactivation_in_std", "variance_ratio", "mean_direction_cos"):
        for when in ("start", "end"):
            cells[f"{key}_{when}"] = spread_cell([r["geometry"][when][key] for r in cored], 2)
    return cells


def _change(ablation: dict) -> str:
    changes = [f"`{k}={v}`" for k, v in ablation["overrides"].items()]
    if ablation["random_core"] != "random_init":
        changes.append(f"random core `{ablation['random_core']}`")
    return ", ".join(changes) or "–"


def core_dynamics_report(folder: str | Path) -> str:
    """A core-dynamics study: the curves' numbers per budget and seed, the ablations against the paper's settings,
    the cores' geometry, and the figures."""
    folder = Path(folder)
    results = read_json(folder / "results.json", CORE_DYNAMICS_RESULTS, RESULTS_REMEDY)
    lines = [
        f"# Core dynamics ({results['source']}, `{results['sparsity']}`)",
        "",
        "E[L0 core] / |C|: the share of the core's latents active per token (dense core: every core latent "
        "with a positive pre-activation; JumpReLU core: every one above its threshold), logged over training; min "
        "and end of the training log.",
        *_dynamics_curves(results["runs"]),
        *_dynamics_ablations(results),
        *_dynamics_geometry(results),
        *_dynamics_countings(results),
    ]
    lines += ["", *(f"![{p.stem}](figures/{p.name})" for p in core_dynamics_figures(results, folder / "figures"))]
    return write_report(folder, lines)


def _dynamics_curves(runs: list[dict]) -> list[str]:
    rows = []
    paper = sorted((r for r in runs if r["ablation"] == "paper"), key=lambda r: (r["budget"], r["core"], r["seed"]))
    recorded = any(r.get("convergence") for r in runs)  # runs from before convergence was recorded have none
    for r in paper:
        curve = [(step, v / r["core_size"]) for step, v in r["l0_core_curve"]] if r["core_size"] else []
        m = r["metrics"]
        shares = ["–", "–", "–"]
        if curve:
            low = min(curve, key=lambda point: point[1])
            shares = [f"{low[1]:.3f} ({low[0]})", f"{curve[-1][1]:.3f}", f"{m['eval_l0_core']:.1f}"]
        held_out = [f"{m['eval_l0_noncore']:.1f}", f"{m['eval_fvu']:.4f}"]
        rows.append([r["budget"], r["core"], r["seed"], r["steps"], *shares, *held_out])
        rows[-1] += [converged_cell(r.get("convergence"))] if recorded else []
    header = ["budget", "core", "seed", "steps", "share min (at step)", "share end", "held-out L0 core"]
    header += ["held-out L0 non-core", "held-out FVU", *(["converged"] if recorded else [])]
    return [
        "",
        "## Curves per budget and seed (the paper's settings)",
        *unconverged_warning([r.get("convergence") for r in runs]),
        "",
        *markdown_table(header, rows),
    ]


def _dynamics_ablations(results: dict) -> list[str]:
    runs, ablations, budget = results["runs"], results["ablations"], results["ablation_budget"]
    rows = []
    for name, ablation in ablations.items():
        for core in ("distilled", ablation["random_core"]):
            chosen = [r for r in runs if r["ablation"] == name and r["core"] == core and r["budget"] == budget]
            if chosen:
                c = _dynamics_summary(chosen)
                firing = f"{c['firing_start']} → {c['firing_end']}"
                cells = [c["seeds"], c["min"], c["end"], c["eval_l0_core"], c["eval_fvu"], firing]
                rows.append([name, core, *cells, c["mean_preactivation_in_std_end"]])
    header = ["ablation", "core", "seeds", "share min", "share end", "held-out L0 core", "held-out FVU"]
    ran = {r["ablation"] for r in runs}
    hypotheses = [[name, a["hypothesis"], _change(a)] for name, a in ablations.items() if name in ran]
    return [
        "",
        "## Hypotheses and their ablations",
        "",
        *markdown_table(["ablation", "hypothesis", "change"], hypotheses),
        "",
        f"At {budget} tokens; mean ± std over seeds. Firing: the share of held-out rows a core latent is on "
        "(start: the initialised model); pre-activation / std: a core latent's mean pre-activation in units of "
        "its spread at the end (≥ 2: on for almost every row).",
        "",
        *markdown_table([*header, "firing start → end", "pre-activation / std"], rows),
    ]


def _dynamics_geometry(results: dict) -> list[str]:
    runs, largest = results["runs"], max(results["budgets"])
    rows = []
    for core in dict.fromkeys(r["core"] for r in runs):
        chosen = [
            r
            for r in runs
            if r["core"] == core
            and r["core_size"]
            and ((r["ablation"] == "paper" and r["budget"] == largest) or r["ablation"] == "random_core_off_top")
        ]
        if chosen:
            c = _dynamics_summary(chosen)
            firing = f"{c['firing_start']} → {c['firing_end']}"
            spread = f"{c['mean_preactivation_in_std_start']} → {c['mean_preactivation_in_std_end']}"
            cells = [c["variance_ratio_start"], c["mean_direction_cos_start"], firing, spread]
            rows.append([core, chosen[0]["budget"], *cells])
    header = ["core", "budget", "variance ratio", "mean-direction cos", "firing start → end"]
    return [
        "",
        "## The cores' geometry",
        "",
        "Variance ratio: the activations' variance along a core row over the mean per direction (1: isotropic); "
        "mean-direction |cos|: alignment of a core row with the activations' mean (both properties of the "
        "frozen rows). Firing and pre-activation / std at the start and the end of the largest budget's runs "
        "(the off-top random core: its ablation's budget).",
        "",
        *markdown_table([*header, "pre-activation / std start → end"], rows),
    ]


def _dynamics_countings(results: dict) -> list[str]:
    """Fig. 3 counted three ways at the end of the paper's runs (studies that recorded `core_usage_curve`)."""
    runs = [r for r in results["runs"] if r["ablation"] == "paper" and r.get("core_usage_curve")]
    if not runs:
        return []
    rows = []
    for budget in sorted({r["budget"] for r in runs}):
        for core in dict.fromkeys(r["core"] for r in runs):
            chosen = [r for r in runs if r["budget"] == budget and r["core"] == core]
            if not chosen:
                continue
            ends = [r["core_usage_curve"][-1] for r in chosen]
            cells = [
                spread_cell([e["l0_core_positive"] / r["core_size"] for e, r in zip(ends, chosen, strict=True)]),
                spread_cell(
                    [
                        e["l0_core_above_threshold"] / r["core_size"]
                        for e, r in zip(ends, chosen, strict=True)
                        if "l0_core_above_threshold" in e
                    ]
                ),
                spread_cell([e["core_energy_share"] for e in ends]),
                spread_cell([r["core_usage"]["fvu_without_core"] - r["core_usage"]["fvu"] for r in chosen]),
            ]
            rows.append([budget, core, len(chosen), *cells])
    header = ["budget", "core", "seeds", "share > 0", "share > threshold", "energy share", "FVU lost without core"]
    return [
        "",
        "## Fig. 3 counted three ways",
        "",
        "At the end of training, on held-out rows in inference mode (`evaluation.core_usage`): the share of core "
        "latents with a positive activation (today's count), the share above the inference threshold the masked "
        "latents use (dictionary_learning's `encode(use_threshold=True)`), the core's share of the "
        "reconstruction's energy, and the held-out FVU lost when the core's latents are zeroed. "
        "`core_countings.png` shows the three over training.",
        "",
        *markdown_table(header, rows),
    ]


def decay_start(learning_rates: list) -> int | None:
    """The first logged step after the peak whose learning rate is below the peak (None: no decay)."""
    peak = max(v for _, v in learning_rates)
    after_peak = learning_rates[[v for _, v in learning_rates].index(peak) :]
    return next((step for step, v in after_peak if v < peak), None)


def core_dynamics_figures(results: dict, folder: Path) -> list[Path]:
    """`l0_core_by_budget.png` (one panel per budget) and `ablations.png` (one panel per ablation, the paper's
    curves dashed)."""
    import matplotlib.pyplot as plt

    runs, budgets = results["runs"], results["budgets"]
    figure, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.6), squeeze=False)
    for axis, budget in zip(axes[0], budgets, strict=False):
        chosen = [r for r in runs if r["ablation"] == "paper" and r["budget"] == budget]
        figures.draw_l0_core(axis, chosen, share=True)
        if (decay := decay_start(chosen[0]["learning_rate_curve"])) is not None:
            axis.axvline(decay, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"{budget} tokens (dotted: the learning rate decays)", fontsize=9)
    paths = [figures.save(figure, folder / "l0_core_by_budget.png")]
    names = [n for n in results["ablations"] if n != "paper" and any(r["ablation"] == n for r in runs)]
    if names:
        budget = results["ablation_budget"]
        paper = [r for r in runs if r["ablation"] == "paper" and r["budget"] == budget and r["core_size"]]
        columns = min(4, len(names))
        rows = -(-len(names) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
        for axis, name in zip(axes.flat, names, strict=False):
            figures.draw_l0_core(axis, paper, share=True, style="--")
            figures.draw_l0_core(axis, [r for r in runs if r["ablation"] == name], share=True)
            axis.set_title(f"{name} (dashed: paper)", fontsize=9)
        for axis in list(axes.flat)[len(names) :]:
            axis.set_visible(False)
        paths.append(figures.save(figure, folder / "ablations.png"))
    counted = [r for r in runs if r["ablation"] == "paper" and r.get("core_usage_curve")]
    if counted:
        largest = [r for r in counted if r["budget"] == max(r["budget"] for r in counted)]
        paths.append(figures.core_countings(largest, folder / "core_countings.png"))
    return paths
