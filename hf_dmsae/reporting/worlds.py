"""A world family's report (its `results.json`): the worlds, the selection and the variants across them."""

from __future__ import annotations

from pathlib import Path

from ..run.results import (
    RESULTS_REMEDY,
    WORLDS_RESULTS,
)
from ..run.variants import VARIANTS
from ..utils.integrity import read_json
from . import figures
from .tables import markdown_table, spread_cell, write_report


def worlds_report(folder: str | Path) -> str:
    """The family of synthetic worlds: each world's settings, properties and headline results, then the benchmark's
    conclusions across the kept worlds (mean ± std over worlds, each world its mean over seeds; the shares of worlds
    where each difference has each sign) and what goes with attribution beating chance."""
    folder = Path(folder)
    results = read_json(
        folder / "results.json", {"identity": dict, **WORLDS_RESULTS, "across_worlds": dict}, RESULTS_REMEDY
    )
    family, study, base = (results["identity"][part] for part in ("family", "study", "base"))
    worlds, across = results["worlds"], results["across_worlds"]
    kept = [name for name, w in worlds.items() if w["kept"]]
    skipped = [name for name, w in worlds.items() if not w["kept"]]
    ranges = ", ".join(
        f"{name.replace('_', ' ')} {family[f'{name}_range'][0]}–{family[f'{name}_range'][1]}"
        for name in ("features_per_dim", "root_features", "hierarchy_depth", "correlation_scale", "zipf_exponent")
    )
    lines = [
        "# Ground truth over many worlds",
        "",
        f"{len(worlds)} worlds drawn (family seed {family['family_seed']}; {ranges}; useful features chosen "
        f"{', '.join(family['useful_by_turns'])} in turn; {base['hidden_dim']} dimensions, dict_size = features), the "
        f"rest as the base benchmark (seeds {study['seeds']}, {base['train_rows']} rows per SAE, transfer k "
        f"{study['ks']}, variants {', '.join(study['variants'])}). A world is kept when a plain Matryoshka "
        f"SAE (k {sorted(study['ks'])[len(study['ks']) // 2]}, seed 0) reaches MCC ≥ "
        f"{results['mcc_floor']}: {len(kept)} kept, {len(skipped)} skipped ({', '.join(skipped) or 'none'}). "
        f"Wall time of the recording runs: {sum(w['seconds'] for w in worlds.values()) / 60:.1f} min (a world whose "
        "benchmark runs were already there when it was recorded counts only what was left).",
        *_worlds_table(worlds),
        *_worlds_selection(across),
        *_worlds_variants(across),
        *_worlds_cycles(across),
        *_worlds_relation(across),
    ]
    plot = figures.r_precision_against_properties(
        across["properties"],
        across["attribution_r_precision"],
        across["selection"]["cycle 0"]["random"]["r_precision"],
        across["relation"],
        folder / "figures" / "r_precision_vs_properties.png",
    )
    lines += ["", f"![R-precision against the worlds' properties](figures/{plot.name})"]
    return write_report(folder, lines)


def _worlds_table(worlds: dict) -> list[str]:
    rows = []
    for name, w in worlds.items():
        s, p = w["settings"], w["properties"]
        cells = [name, f"{p['features_per_dim']:.2f}", s["root_features"], s["hierarchy_depth"]]
        cells += [
            s["correlation_scale"],
            s["zipf_exponent"],
            s["useful_by"],
            f"{p['useful_frequency_correlation']:+.2f}",
        ]
        cells += [f"{p['true_l0']:.2f}", f"{w['screen_mcc']:.3f}", "yes" if w["kept"] else "**skipped**"]
        summary = w.get("summary")
        if summary:
            ranking = summary["selection"]["cycle 0"]
            cells += [spread_cell(summary["pool_useful"])]
            cells += [
                spread_cell([v for v in ranking[m]["r_precision"] if v is not None]) for m in ("attribution", "random")
            ]
        else:
            cells += ["–"] * 3
        rows.append(cells)
    header = ["world", "features/dim", "roots", "depth", "corr.", "zipf", "useful", "ρ(useful, freq.)", "true L0"]
    header += ["screen MCC", "kept", "pool useful share", "GxA R-prec. (cycle 0)", "random R-prec. (cycle 0)"]
    return [
        "",
        "## Every world",
        "",
        "`ρ(useful, freq.)`: Spearman's correlation over features between being useful and firing probability. "
        "`pool useful share`: the cycle-0 candidate pool's latents that match a useful feature (random ranking's "
        "expected R-precision). Cells: mean ± std over seeds.",
        "",
        *markdown_table(header, rows),
    ]


def _worlds_signs(signs: dict) -> str:
    return f"{signs['positive']:.0%} / {signs['negative']:.0%}"


def _worlds_selection(across: dict) -> list[str]:
    rows = []
    for core, methods in across["selection"].items():
        for method, scores in methods.items():
            cells = [core, method]
            cells += [spread_cell([v for v in scores[s] if v is not None]) for s in ("r_precision", "precision")]
            if method == "attribution":
                cells += ["–"] * 4
            else:
                lift = across["attribution_minus"][core][method]
                for score in ("r_precision", "precision"):
                    cell = lift[score]
                    cells += [
                        spread_cell(cell["differences"]),
                        _worlds_signs(cell["signs"]) if "signs" in cell else "–",
                    ]
            rows.append(cells)
    header = ["core", "selection", "R-precision", "core precision", "GxA − it: R-prec.", "+ / − worlds"]
    header += ["GxA − it: precision", "+ / − worlds"]
    return [
        "",
        "## Selection against the useful features, across worlds",
        "",
        "Mean ± std over kept worlds (each world: its mean over seeds). `GxA − it`: attribution's score minus this "
        "selection's in the same world; `+ / −`: the shares of worlds where that difference is positive / negative.",
        "",
        *markdown_table(header, rows),
    ]


def _worlds_variants(across: dict) -> list[str]:
    rows = [
        [
            cell["k"],
            cell["variant"],
            *(
                spread_cell([v for v in cell[m] if v is not None], 3)
                for m in ("l0", "mcc", "fvu", "task_loss_recovered")
            ),
        ]
        for cell in sorted(across["transfer"].values(), key=lambda c: (VARIANTS.index(c["variant"]), c["k"]))
    ]
    matched = []
    for variant, by_k in across["matched"].items():
        for k, cell in sorted(by_k.items(), key=lambda item: int(item[0][1:])):
            for metric in ("mcc", "fvu", "task_loss_recovered"):
                if cell.get(metric):
                    n = len(cell[metric])
                    matched.append(
                        [k[1:], variant, metric, spread_cell(cell[metric]), n, _worlds_signs(cell[f"{metric}_signs"])]
                    )
    return [
        "",
        "## Transferred SAEs, across worlds",
        "",
        "Mean ± std over kept worlds; MCC against every true feature.",
        "",
        *markdown_table(["k", "variant", "L0", "MCC", "FVU", "task loss recovered"], rows),
        "",
        "## Each variant − the Matryoshka SAE at matched measured L0, across worlds",
        "",
        "Per world and seed, the Matryoshka SAE's value at the variant's measured L0 is read off the same seed's "
        "Matryoshka curve (linear in log L0; outside its range, no difference: `worlds` counts where there is one). "
        "FVU: lower is better.",
        "",
        *markdown_table(["k", "variant", "metric", "Δ", "worlds", "+ / − worlds"], matched),
    ]


def _worlds_cycles(across: dict) -> list[str]:
    rows = [
        [t, spread_cell(shares), f"{across['whole_core_reselected'][t]:.0%}"]
        for t, shares in across["carried_over"].items()
    ]
    return [
        "",
        "## Carry-over between cycles, across worlds",
        "",
        *markdown_table(
            ["cycle", "share of the previous core selected again", "worlds where every seed re-selected it whole"], rows
        ),
    ]


def _worlds_relation(across: dict) -> list[str]:
    rows = [
        [name, *(f"{v:+.2f}" if v is not None else "–" for v in (r["r_precision"], r["lift_over_random"]))]
        for name, r in across["relation"].items()
    ]
    return [
        "",
        "## What goes with attribution beating chance",
        "",
        "Spearman's ρ over kept worlds between a world property and GxA's cycle-0 R-precision, and its lift over "
        "the random ranking's (GxA − random).",
        "",
        *markdown_table(["property", "ρ with GxA R-precision", "ρ with GxA − random"], rows),
    ]
