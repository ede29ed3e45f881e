"""A distillation's report (its `state.json` and cores): cycles, cores, slices, controls, figures, repos."""

from __future__ import annotations

from pathlib import Path

from ..data.slices import SliceLayout
from ..publishing import card_figures
from ..run.state import carry_over, load_recorded_core, read_state
from . import figures
from .convergence import converged_cell, unconverged_warning
from .tables import NAN, figure_lines, markdown_table, repo_lines, write_report


def distillation_figures(folder: str | Path) -> dict[str, Path]:
    """A distillation's figures from its `state.json` and cores: coverage curves, carry-over, selection convergence
    (with tracking) and `l0_core` of the controls (with controls)."""
    folder = Path(folder)
    state = read_state(folder, "distillation", "cycles", "distilled")
    cores = [load_recorded_core(folder, state["cycles"][str(t)]) for t in range(state["distilled"]["last_cycle"] + 1)]
    out = folder / "figures"
    tau = state["identity"]["AttributionArguments.tau"]
    plots = {
        "coverage_curves": card_figures.coverage_curves(cores, tau, out / "coverage_curves.png"),
        "carry_over": card_figures.carry_over(carry_over(state), out / "carry_over.png"),
    }
    tracks = {int(t): c["track"] for t, c in state["cycles"].items() if c.get("track")}
    if tracks:
        finals = {t: set(cores[t].latent_ids) for t in tracks}
        plots["selection_convergence"] = figures.selection_convergence(
            tracks, finals, out / "selection_convergence.png"
        )
    if control := state.get("control"):
        plots["l0_core"] = figures.l0_core_curves(control, out / "l0_core.png")
    return plots


def slice_table(records: list[dict]) -> list[str]:
    """The slices of the token stream a run read: slice, split, sequences, rows per reader."""
    rows = []
    for piece in SliceLayout(records):
        first, end = piece.sequence_range
        last = end - 1 if end is not None else "…"
        rows.append([piece.name, piece.split, f"{first} – {last}", piece.rows if piece.rows is not None else "all"])
    return markdown_table(["slice", "split", "sequences", "rows per reader"], rows)


def distillation_report(folder: str | Path) -> str:
    """A distillation's cycles, distilled core, slices, controls (Fig. 3), figures and repos."""
    folder = Path(folder)
    distillation_figures(folder)
    state = read_state(folder, "distillation", "cycles", "distilled")
    last = state["distilled"]["last_cycle"]
    rows, cycles = [], [state["cycles"][str(t)] for t in range(last + 1)]
    recorded = any("convergence" in c for c in cycles)  # since convergence is recorded
    for t, c in enumerate(cycles):
        m = c.get("metrics", {})
        cells = [t, c["size"], f"{c['coverage']:.3f}", c["carried_over"] if t else "–"]
        rows.append(cells + [f"{m[k]:.4f}" if k in m else "–" for k in ("eval_fvu", "eval_l0_core", "eval_l0_noncore")])
        rows[-1] += [converged_cell(c.get("convergence"))] if recorded else []
    lines = [
        f"# Distillation report: {state['model_repo']}",
        "",
        f"Every cycle trains on its own slice of the token stream with `k_noncore = {state['k_noncore']}` (fixed "
        "for the run); cores are scored on the attribution split, which no cycle trains on.",
        "",
        *markdown_table(
            [
                "cycle",
                "core size",
                "coverage",
                "carried over from previous core",
                "held-out FVU",
                "L0 core",
                "L0 non-core",
                *(["converged"] if recorded else []),
            ],
            rows,
        ),
        *unconverged_warning([c.get("convergence") for c in cycles]),
        "",
        f"Distilled core `C^({last}) ∩ C^({last - 1})`: **{state['distilled']['size']} latents**.",
        "",
        "## Slices of the token stream",
        "",
        *slice_table(state["slices"]),
        "",
    ]
    if control := state.get("control"):
        rows = []
        for _, result in sorted(control.items()):
            curve = [v for _, v in result["l0_core_curve"]] or [NAN]
            m = result["metrics"]
            rows.append(
                [
                    result["core"],
                    result["seed"],
                    f"{min(curve):.2f}",
                    f"{curve[-1]:.2f}",
                    f"{m.get('eval_fvu', NAN):.4f}",
                    f"{m.get('eval_l0_core', NAN):.2f}",
                ]
            )
        header = ["core", "seed", "E[L0 core] min", "E[L0 core] end", "held-out FVU", "held-out L0 core"]
        if any("convergence" in r for r in control.values()):
            header.append("converged")
            for row, (_, result) in zip(rows, sorted(control.items()), strict=True):
                row.append(converged_cell(result.get("convergence")))
        lines += [
            "## Controls (Fig. 3)",
            "",
            "`random_init`: random unit rows, the paper's control; `random_trained`: trained latents of the "
            "last cycle outside the distilled core. Same slice, budget and seeds as the distilled core.",
            "",
            *markdown_table(header, rows),
            "",
        ]
    lines += figure_lines(folder)
    if (folder / "repos").is_dir():
        lines += ["", "## Repos", "", *repo_lines(folder)]
    return write_report(folder, lines)
