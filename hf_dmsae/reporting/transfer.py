"""A transfer's report (its `state.json`): its own and SAEBench metrics per k and variant."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.saebench import HEADLINE_METRICS
from ..run.state import read_state
from ..run.variants import VARIANTS
from . import figures
from .convergence import converged_cell, unconverged_warning
from .tables import markdown_table, repo_lines, write_report


def transfer_report(folder: str | Path) -> str:
    """A transfer's own and SAEBench metrics per k and variant, the evals not run, its repos and Fig. 4."""
    folder = Path(folder)
    state = read_state(folder, "transfer", "results", "core")
    results = state["results"]
    columns = ("fvu", "ce_loss_recovered", "l0", "l0_core", "l0_noncore", "dead_fraction")
    columns += tuple(c for _, _, c in HEADLINE_METRICS if any(c in r for r in results.values()))
    rows, skipped = [], {}
    recorded = any("convergence" in r for r in results.values())  # since convergence is recorded
    for result in sorted(results.values(), key=lambda r: (r["k"], VARIANTS.index(r["variant"]))):
        rows.append([result["k"], result["variant"], *(f"{result[c]:.4f}" if c in result else "–" for c in columns)])
        rows[-1] += [converged_cell(result.get("convergence"))] if recorded else []
        skipped |= {
            name: r.get("skipped") or r["failed"]
            for name, r in result.get("saebench", {}).items()
            if "skipped" in r or "failed" in r
        }
    lines = [
        f"# Transfer report: core `{state['core']['source']}` ({state['core']['size']} latents)",
        "",
        "Own metrics on held-out text; `sb_*` columns are SAEBench's (`saebench/<eval>/` holds their JSON).",
        "",
        *markdown_table(["k", "variant", *columns, *(["converged"] if recorded else [])], rows),
        *unconverged_warning([r.get("convergence") for r in results.values()]),
    ]
    if skipped:
        lines += ["", "SAEBench evals not run:", ""] + [f"- {name}: {reason}" for name, reason in skipped.items()]
    if (folder / "repos").is_dir():
        lines += ["", "Repos (local folders; pushed with `push_to_hub`):", "", *repo_lines(folder)]
    if results:
        plot = figures.metrics_against_k(list(results.values()), columns[:4], folder / "figures" / "metrics_vs_k.png")
        lines += ["", f"![metrics against k](figures/{plot.name})"]
    return write_report(folder, lines)
