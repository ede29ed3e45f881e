"""The ground-truth benchmark's report (its `results.json`): every number with its mean ± std over seeds."""

from __future__ import annotations

from pathlib import Path

from ..run.results import (
    RESULTS_REMEDY,
    SYNTHETIC_RESULTS,
)
from ..utils.integrity import read_json
from . import figures
from .convergence import converged_of, unconverged_warning
from .tables import latent_matches_tables, markdown_table, matched_table, spread_cell, write_report


def synthetic_report(folder: str | Path) -> str:
    """The ground-truth benchmark from its `results.json`: every number with its mean ± std over seeds."""
    folder = Path(folder)
    results = read_json(
        folder / "results.json",
        {"identity": dict, **SYNTHETIC_RESULTS, "world": dict, "consistency": dict},
        RESULTS_REMEDY,
    )
    study = results["identity"]["study"]
    seeds = [results[f"seed{s}"] for s in study["seeds"]]
    cores = list(dict.fromkeys(r["core"] for r in seeds[0]["selection"]))
    selections = tuple(dict.fromkeys(r["selection"] for r in seeds[0]["selection"]))
    names = [(k, v) for k in study["ks"] for v in study["variants"]]
    progressive = [s["progressive"] for s in seeds if s.get("progressive")]
    lines = [
        *_synthetic_settings(results),
        *_synthetic_cycles(seeds),
        *_synthetic_selection(seeds, cores, selections),
        *(_synthetic_consensus(seeds, results["consensus"]) if "consensus" in results else []),
        *_synthetic_transfer(results, seeds, names),
        *(matched_table(results["matched"]) if "matched" in results else []),
        *(latent_matches_tables(results["latent_matches"]) if "latent_matches" in results else []),
        *_synthetic_progressive(progressive),
    ]
    plots = synthetic_figures(folder, results, cores, selections, names, progressive)
    lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in plots]
    return write_report(folder, lines)


def _synthetic_settings(results: dict) -> list[str]:
    identity, world = results["identity"], results["world"]
    a, study, sae, attribution = identity["synthetic"], identity["study"], identity["sae"], identity["attribution"]
    depth = a.get("hierarchy_depth", 2)
    return [
        "# Synthetic ground-truth benchmark (sae_lens.synthetic + a downstream readout task)",
        "",
        f"World: {a['num_features']} features in {a['hidden_dim']} dimensions (Zipfian firing "
        f"{a['min_firing_probability']}–{a['max_firing_probability']}, exponent {a['zipf_exponent']}; hierarchy of "
        f"{a['root_features']} roots, branching {a['branching_factor']}, depth {depth}; low-rank correlations rank "
        f"{a['correlation_rank']}, scale {a['correlation_scale']}); true L0 {world['true_l0']:.2f}. "
        f"Task: {a['readout_classes']} classes from a readout weighting "
        f"{world['useful']} useful features{_useful_by(a)} ×{a['readout_scale']} and the others "
        f"×{a['readout_scale'] * a['readout_off_weight']:g}; the downstream model is a linear probe fitted on x.",
        "",
        f"SAEs of {sae['dict_size']} latents, {a['train_rows']} fresh rows each; distillation at "
        f"k={sae['k']} ({sae['sparsity'].replace('_', '-')} cycles) "
        f"over {a['num_cycles'] + 1} cycles (q={attribution['q']}, τ={attribution['tau']}, "
        f"{attribution['attribution_tokens']} attribution rows); seeds {study['seeds']}; every cell is mean ± "
        f"standard deviation over seeds. A latent matches a feature when their directions' |cos| ≥ {a['match_cos']}.",
        "",
        f"Runtime: {sum(results.get('seconds', {}).values()) / 60:.1f} min for {len(study['seeds'])} seeds.",
    ]


def _useful_by(a: dict) -> str:
    return f" (the {a['useful_by']} ones)" if a.get("useful_by", "random") != "random" else ""


def _synthetic_cycles(seeds: list[dict]) -> list[str]:
    rows = [
        [
            t,
            spread_cell([s["cycles"][t]["size"] for s in seeds], 1),
            spread_cell([s["cycles"][t]["carried_over"] for s in seeds], 1) if t != "0" else "–",
            spread_cell([s["cycles"][t]["l0_core"] for s in seeds], 1) if t != "0" else "–",
        ]
        for t in seeds[0]["cycles"]
    ]
    return [
        "",
        "## Cores of the distillation cycles",
        "",
        "`L0 core`: active core latents per row (held-out rows, inference mode); a dense core is never masked, a "
        "sparse core competes in the one BatchTopK.",
        "",
        *markdown_table(["cycle", "core size", "carried over from the previous core", "L0 core"], rows),
    ]


def _synthetic_selection(seeds: list[dict], cores: list[str], selections: tuple[str, ...]) -> list[str]:
    rows = []
    for core in cores:
        for selection in selections:
            runs = [r for s in seeds for r in s["selection"] if r["core"] == core and r["selection"] == selection]
            ranked = [r["r_precision"] for r in runs if r["r_precision"] is not None]
            scores = [spread_cell([r[m] for r in runs]) for m in ("precision", "recall", "mcc")]
            rows.append([core, spread_cell([r["size"] for r in runs], 1), selection, *scores, spread_cell(ranked)])
    header = ["core", "size", "selection", "precision", "recall", "MCC with the useful features"]
    return [
        "",
        "## Core selection against the useful features",
        "",
        "Each core (cycle t's, and the distilled `C^(T) ∩ C^(T−1)`) is compared with selections of the same size "
        "from the same model's candidate pool: random latents, latents by activation frequency and by mean "
        "squared activation (held-out rows). `R-precision` ranks the whole pool by each method and takes the "
        "share of useful latents among its first m, m the number of pool latents that match a useful feature: "
        "how well the ranking separates them, whatever core size τ gives.",
        "",
        *markdown_table([*header, "R-precision of the pool ranking"], rows),
    ]


def _synthetic_consensus(seeds: list[dict], consensus: dict[str, list[dict]]) -> list[str]:
    cycles = len(seeds[0]["cycles"])
    rows = []
    for core in dict.fromkeys(r["core"] for r in seeds[0]["selection"]):
        runs = [r for s in seeds for r in s["selection"] if r["core"] == core and r["selection"] == "attribution"]
        trainings = cycles if core == "distilled" else int(core.split()[-1]) + 1
        rows.append([core, trainings, len(runs), *_truth_cells(runs)])
    for name, runs in consensus.items():
        rows.append([name + " cycle-0 seeds", int(name.split()[-1]), len(runs), *_truth_cells(runs)])
    return [
        "",
        "## What cycles buy: cycles against a consensus of cycle-0 seeds",
        "",
        "At the same number of SAE trainings: cycle t's core (t + 1 trainings) and the distilled core, against a "
        "consensus core of m seeds' cycle 0 (m trainings: a reference seed's cycle-0 core latents whose decoder "
        "direction is selected in a majority of the m seeds' cycle-0 cores, at the latent-match cosine; every "
        "reference seed with every choice of the others).",
        "",
        *markdown_table(
            ["core", "trainings", "cores", "size", "precision", "recall", "MCC with the useful features"], rows
        ),
    ]


def _truth_cells(runs: list[dict]) -> list[str]:
    cells = [spread_cell([r["size"] for r in runs], 1)]
    return cells + [spread_cell([r[m] for r in runs if r[m] is not None]) for m in ("precision", "recall", "mcc")]


def _synthetic_transfer(results: dict, seeds: list[dict], names: list[tuple[int, str]]) -> list[str]:
    rows, records = [], []
    recorded = any(run.get("convergence") for s in seeds for run in s["transfer"].values())
    for k, variant in names:
        runs = [s["transfer"][f"k{k}-{variant}"] for s in seeds]
        records += [r.get("convergence") for r in runs]
        cells = [
            spread_cell([r[c] for r in runs], 2 if c.startswith("l0") else 3)
            for c in ("mcc", "fvu", "l0", "l0_core", "task_loss_recovered")
        ]
        rows.append([k, variant, *cells, spread_cell(results["consistency"][f"k{k}-{variant}"])])
        rows[-1] += [converged_of([r.get("convergence") for r in runs])] if recorded else []
    header = ["k", "variant", "MCC", "FVU", "L0", "L0 core", "task loss recovered", "consistency"]
    header += ["converged"] if recorded else []
    lines = [
        "",
        "## Transferred SAEs (MCC against all true features)",
        *unconverged_warning(records),
        "",
        "`consistency`: mean best-match |cos| between two seeds' decoders, over every pair of seeds.",
        "",
        *markdown_table(header, rows),
    ]
    if "matryoshka" not in results["identity"]["study"]["variants"]:
        return lines
    rows = []
    for k, variant in names:
        if variant != "matryoshka":
            differences = [
                [s["transfer"][f"k{k}-{variant}"][c] - s["transfer"][f"k{k}-matryoshka"][c] for s in seeds]
                for c in ("mcc", "fvu", "task_loss_recovered")
            ]
            rows.append([k, variant, *(spread_cell(d) for d in differences)])
    return lines + [
        "",
        "## Paired differences DMSAE − Matryoshka (same seed, same k)",
        "",
        "The sparse-core DMSAE has the Matryoshka SAE's L0 (one BatchTopK of k); the dense-core one adds "
        "its core's activity to `k_noncore` (Eq. 4), so its L0 is higher (table above).",
        "",
        *markdown_table(["k", "variant", "Δ MCC", "Δ FVU", "Δ task loss recovered"], rows),
    ]


def _synthetic_progressive(progressive: list[dict]) -> list[str]:
    if not progressive:
        return []
    prefixes = progressive[0]["prefixes"]
    rows = [
        [name, *(spread_cell([p["fvu"][name][i] for p in progressive]) for i in range(len(prefixes)))]
        for name in progressive[0]["fvu"]
    ]
    return [
        "",
        f"## Progressive coding at k={progressive[0]['k']}: FVU of the first G latents",
        "",
        *markdown_table(["order", *(f"G={g}" for g in prefixes)], rows),
    ]


def synthetic_figures(folder: Path, results: dict, cores, selections, names, progressive) -> list[Path]:
    seeds = [results[f"seed{s}"] for s in results["identity"]["study"]["seeds"]]
    out = folder / "figures"
    rows = [r for s in seeds for r in s["selection"]]
    chosen = {
        (core, sel): [r for r in rows if r["core"] == core and r["selection"] == sel]
        for core in cores
        for sel in selections
    }
    plots = [figures.selection_against_truth(chosen, cores, selections, out / "selection_vs_truth.png")]
    transfer = [
        {
            "k": k,
            "variant": v,
            **{c: [s["transfer"][f"k{k}-{v}"][c] for s in seeds] for c in ("mcc", "fvu", "task_loss_recovered")},
            "consistency": results["consistency"][f"k{k}-{v}"],
        }
        for k, v in names
    ]
    metrics = ("mcc", "consistency", "fvu", "task_loss_recovered")
    plots.append(figures.metrics_against_k(transfer, metrics, out / "synthetic_vs_k.png"))
    if progressive:
        plots.append(figures.prefix_fvu_curves(progressive, out / "progressive_coding.png"))
    return plots
