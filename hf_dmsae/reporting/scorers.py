"""The scorers study's report (its `results.json`)."""

from __future__ import annotations

from pathlib import Path

from ..run.results import (
    RESULTS_REMEDY,
    SCORERS_RESULTS,
)
from ..utils.integrity import read_json
from .tables import markdown_table, spread_cell, write_report


def scorers_report(folder: str | Path) -> str:
    """The scorers compared (`studies.scorers`): in the synthetic world each scorer's cores against the useful
    features over seeds, and its cost; on the LM each ranking against GxA's, and the cost."""
    folder = Path(folder)
    results = read_json(folder / "results.json", {"identity": dict, **SCORERS_RESULTS}, RESULTS_REMEDY)
    lines = ["# Scorers: GxA, latent ablation and integrated gradients"]
    if "synthetic" in results:
        lines += [
            "",
            "## Synthetic world: each scorer's distillation against the useful features (mean ± std over seeds)",
        ]
        rows = []
        for spec, seeds in results["synthetic"].items():
            runs = list(seeds.values())
            for core in dict.fromkeys(r["core"] for run in runs for r in run["selection"]):
                picked = [r for run in runs for r in run["selection"] if r["core"] == core]
                cell = {
                    key: spread_cell([r[key] for r in picked if r[key] is not None])
                    for key in ("r_precision", "precision", "recall")
                }
                size = spread_cell([r["size"] for r in picked], 1)
                rows.append([spec, core, len(picked), cell["r_precision"], cell["precision"], cell["recall"], size])
        lines += markdown_table(["scorer", "core", "seeds", "R-precision", "precision", "recall", "size"], rows)
        cost = [
            [
                spec,
                spread_cell([s for run in seeds.values() for s in run["scoring_seconds"]], 2),
                next(iter(seeds.values()))["scored_rows"],
                " / ".join(
                    spread_cell([run["carried_over"][t] for run in seeds.values()], 1)
                    for t in range(1, len(next(iter(seeds.values()))["carried_over"]))
                ),
            ]
            for spec, seeds in results["synthetic"].items()
        ]
        lines += ["", "Seconds per scoring (every cycle of every seed) and the latents each cycle carried over:", ""]
        lines += markdown_table(["scorer", "seconds per scoring", "rows scored", "carried over (cycles 1…)"], cost)
    if "lm" in results:
        lm = results["lm"]
        lines += ["", f"## LM: `{lm['model']}`, {lm['pool']} latents in the pool, each scorer against GxA", ""]
        comparison = lm.get("comparison", {})
        rows = []
        for name, scored in lm["scorers"].items():
            c = comparison.get(name, {})
            rows.append(
                [
                    name,
                    scored["positions"],
                    f"{scored['seconds']:.1f}",
                    f"{scored['ms_per_latent_position']:.4f}",
                    c.get("core_size", "–"),
                    *(
                        f"{c[key]:.3f}" if key in c else "–"
                        for key in (
                            "spearman vs gxa",
                            "spearman vs gxa (whole split)",
                            "core jaccard vs gxa",
                            "core jaccard vs gxa (whole split)",
                        )
                    ),
                ]
            )
        header = [
            "scorer",
            "positions",
            "seconds",
            "ms per latent × position",
            "core size",
            "Spearman vs GxA (same positions)",
            "Spearman vs GxA (whole split)",
            "core Jaccard vs GxA (same)",
            "core Jaccard vs GxA (whole)",
        ]
        lines += markdown_table(header, rows)
    return write_report(folder, lines)
