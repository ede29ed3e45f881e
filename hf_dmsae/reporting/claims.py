"""The paper's claims study's report (its `results.json`): metrics over seeds, at matched measured L0."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.saebench import HEADLINE_METRICS
from ..run.results import (
    CLAIMS_RESULTS,
    RESULTS_REMEDY,
)
from ..run.variants import VARIANTS
from ..utils.integrity import read_json
from . import figures
from .convergence import converged_of, unconverged_warning
from .tables import latent_matches_tables, markdown_table, matched_table, spread_cell, write_report


def _over_seeds(results: dict) -> list[dict]:
    """Each (k, variant) with every metric as its list over seeds, in the order of `VARIANTS`."""
    models = {}
    for seed in results["models"].values():
        for name, result in seed.items():
            row = models.setdefault(name, {"k": result["k"], "variant": result["variant"]})
            for key, value in result.items():
                if isinstance(value, int | float) and key != "k":
                    row.setdefault(key, []).append(value)
    return sorted(models.values(), key=lambda r: (VARIANTS.index(r["variant"]), r["k"]))


def claims_report(folder: str | Path) -> str:
    """The paper's claims study: every model's metrics over seeds, the differences against the Matryoshka SAE at
    matched measured L0, the consistency of latents across sparsities and seeds, and the figure of every metric
    against measured L0."""
    folder = Path(folder)
    results = read_json(
        folder / "results.json", {**CLAIMS_RESULTS, "matched": CLAIMS_RESULTS["matched?"]}, RESULTS_REMEDY
    )
    identity, models = results["identity"], _over_seeds(results)
    seeds = sorted(results["models"])
    wide = sorted({m["k"] for m in models if m["variant"] == "matryoshka"} - set(identity["StudyArguments.ks"]))
    metrics = ["fvu", "ce_loss_recovered", "dead_fraction"]
    metrics += [c for _, _, c in HEADLINE_METRICS if any(c in m for m in models)]
    rows = [
        [m["k"], m["variant"], *(spread_cell(m.get(c, []), 2) for c in ("l0", "l0_core", "l0_noncore"))]
        + [spread_cell(m.get(c, [])) for c in metrics]
        for m in models
    ]
    records = {
        name: [seed[name].get("convergence") for seed in results["models"].values() if name in seed]
        for name in {n for seed in results["models"].values() for n in seed}
    }
    header = ["k", "variant", "L0", "L0 core", "L0 non-core", *metrics]
    if any(r is not None for rs in records.values() for r in rs):  # recorded since convergence is
        header.append("converged")
        for row, m in zip(rows, models, strict=True):
            row.append(converged_of(records[f"k{m['k']}-{m['variant']}"]))
    if "cores" in results:  # each seed its own distillation's core
        cores = ", ".join(f"{seed}'s `{c['source']}` ({c['size']} latents)" for seed, c in results["cores"].items())
        moved = f"Each seed's distilled core ({cores}) transferred"
    else:
        moved = f"The distilled core `{results['core']['source']}` ({results['core']['size']} latents) transferred"
    lines = [
        "# The paper's claims on the embedded default",
        "",
        f"{moved} at "
        f"k {identity['StudyArguments.ks']} in every variant, and the Matryoshka SAE also at k "
        f"{wide}; {len(seeds)} seeds ({', '.join(seeds)}), each seed's models "
        "on the same tokens. `random_*`: the paper's control, a random-init core of the same size. Every cell is "
        "mean ± standard deviation over seeds; own metrics on held-out text, `sb_*` are SAEBench's."
        + "".join(
            f" `{variant}` at {', '.join(f'{k} {v}' for k, v in settings.items())}."
            for variant, settings in results.get("variant_settings", {}).items()
        ),
        "",
        "## Every model",
        "",
        *markdown_table(header, rows),
        *unconverged_warning([r for rs in records.values() for r in rs]),
        *matched_table(
            results["matched"], "Claim 3 at matched sparsity: each variant − the Matryoshka SAE at the same measured L0"
        ),
        *(_core_overlap(results["core_overlap"]) if "core_overlap" in results else []),
        *(latent_matches_tables(results["latent_matches"]) if "latent_matches" in results else []),
    ]
    skipped = {}
    for seed in results["models"].values():
        for result in seed.values():
            for name, r in result.get("saebench", {}).items():
                if "skipped" in r or "failed" in r:
                    skipped[name] = r.get("skipped") or r["failed"]
    if skipped:
        lines += ["", "SAEBench evals not run:", ""] + [f"- {name}: {reason}" for name, reason in skipped.items()]
    plot = figures.metrics_against_l0(models, tuple(metrics), folder / "figures" / "metrics_vs_l0.png")
    lines += ["", f"![metrics against measured L0](figures/{plot.name})"]
    return write_report(folder, lines)


def _core_overlap(overlap: dict) -> list[str]:
    rows = [
        [kind, spread_cell(overlap[key]), f"{min(overlap[key]):.3f} … {max(overlap[key]):.3f}"]
        for kind, key in (("distilled cores", "distilled"), ("random trained latents (control)", "random_trained"))
    ]
    return [
        "",
        "## Claim 1: the same core from every seed",
        "",
        f"Seeds {overlap['seeds']}, distilled core sizes {overlap['sizes']}. For every ordered pair of seeds, the "
        f"share of one seed's core whose encoder direction has a match (cosine ≥ {overlap['match_cos']}) in the "
        "other's; the control: each seed's as many trained latents of its last cycle outside its core.",
        "",
        *markdown_table(["cores", "matched share (mean ± std over pairs)", "range"], rows),
    ]
