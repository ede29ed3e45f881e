"""Every report of the package, written from what a run recorded: a distillation's and a transfer's `state.json`, the
synthetic benchmark's and the core-dynamics study's `results.json`. Each `*_report(folder)` draws its figures into
`<folder>/figures/`, writes `<folder>/report.md` and returns its text, so a committed report regenerates from its
committed results."""

from __future__ import annotations

from pathlib import Path

from ..data.slices import SliceLayout
from ..evaluation.saebench import HEADLINE_METRICS
from ..model.configuration_dmsae import VARIANTS
from ..run.results import (
    CLAIMS_RESULTS,
    CORE_DYNAMICS_RESULTS,
    RESULTS_REMEDY,
    SCORERS_RESULTS,
    SYNTHETIC_RESULTS,
    WORLDS_RESULTS,
)
from ..run.state import load_recorded_core, read_state
from ..utils.integrity import read_json
from . import figures
from .tables import markdown_table, spread_cell

NAN = float("nan")


def _write(folder: Path, lines: list[str]) -> str:
    text = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(text)
    return text


def _figure_lines(folder: Path) -> list[str]:
    return [f"![{p.stem}](figures/{p.name})" for p in sorted((folder / "figures").glob("*.png"))]


def _repo_lines(folder: Path) -> list[str]:
    return [f"- `{p.name.replace('__', '/')}`: `{p}`" for p in sorted((folder / "repos").iterdir())]


# -- distillation ---------------------------------------------------------------------------------------------------
def carry_over(state: dict) -> list[dict]:
    """Fig. 2's numbers: each cycle's core size and how many of its latents the previous core held."""
    cycles = sorted(state["cycles"].items(), key=lambda item: int(item[0]))
    return [{"cycle": int(t), "size": c["size"], "kept": c["carried_over"]} for t, c in cycles if "size" in c]


def distillation_figures(folder: str | Path) -> dict[str, Path]:
    """A distillation's figures from its `state.json` and cores: coverage curves, carry-over, selection convergence
    (with tracking) and `l0_core` of the controls (with controls)."""
    folder = Path(folder)
    state = read_state(folder, "distillation", "cycles", "distilled")
    cores = [load_recorded_core(folder, state["cycles"][str(t)]) for t in range(state["distilled"]["last_cycle"] + 1)]
    out = folder / "figures"
    tau = state["identity"]["AttributionArguments.tau"]
    plots = {
        "coverage_curves": figures.coverage_curves(cores, tau, out / "coverage_curves.png"),
        "carry_over": figures.carry_over(carry_over(state), out / "carry_over.png"),
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
    rows = []
    for t in range(last + 1):
        c = state["cycles"][str(t)]
        m = c.get("metrics", {})
        cells = [t, c["size"], f"{c['coverage']:.3f}", c["carried_over"] if t else "–"]
        rows.append(cells + [f"{m[k]:.4f}" if k in m else "–" for k in ("eval_fvu", "eval_l0_core", "eval_l0_noncore")])
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
            ],
            rows,
        ),
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
        lines += [
            "## Controls (Fig. 3)",
            "",
            "`random_init`: random unit rows, the paper's control; `random_trained`: trained latents of the "
            "last cycle outside the distilled core. Same slice, budget and seeds as the distilled core.",
            "",
            *markdown_table(header, rows),
            "",
        ]
    lines += _figure_lines(folder)
    if (folder / "repos").is_dir():
        lines += ["", "## Repos", "", *_repo_lines(folder)]
    return _write(folder, lines)


# -- transfer -------------------------------------------------------------------------------------------------------
def transfer_report(folder: str | Path) -> str:
    """A transfer's own and SAEBench metrics per k and variant, the evals not run, its repos and Fig. 4."""
    folder = Path(folder)
    state = read_state(folder, "transfer", "results", "core")
    results = state["results"]
    columns = ("fvu", "ce_loss_recovered", "l0", "l0_core", "l0_noncore", "dead_fraction")
    columns += tuple(c for _, _, c in HEADLINE_METRICS if any(c in r for r in results.values()))
    rows, skipped = [], {}
    for result in sorted(results.values(), key=lambda r: (r["k"], VARIANTS.index(r["variant"]))):
        rows.append([result["k"], result["variant"], *(f"{result[c]:.4f}" if c in result else "–" for c in columns)])
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
        *markdown_table(["k", "variant", *columns], rows),
    ]
    if skipped:
        lines += ["", "SAEBench evals not run:", ""] + [f"- {name}: {reason}" for name, reason in skipped.items()]
    if (folder / "repos").is_dir():
        lines += ["", "Repos (local folders; pushed with `push_to_hub`):", "", *_repo_lines(folder)]
    if results:
        plot = figures.metrics_against_k(list(results.values()), columns[:4], folder / "figures" / "metrics_vs_k.png")
        lines += ["", f"![metrics against k](figures/{plot.name})"]
    return _write(folder, lines)


# -- the synthetic benchmark ----------------------------------------------------------------------------------------
def synthetic_report(folder: str | Path) -> str:
    """The ground-truth benchmark from its `results.json`: every number with its mean ± std over seeds."""
    folder = Path(folder)
    results = read_json(
        folder / "results.json",
        {"identity": dict, **SYNTHETIC_RESULTS, "world": dict, "consistency": dict},
        RESULTS_REMEDY,
    )
    a = results["identity"]["synthetic"]
    seeds = [results[f"seed{s}"] for s in a["seeds"]]
    cores = list(dict.fromkeys(r["core"] for r in seeds[0]["selection"]))
    selections = tuple(dict.fromkeys(r["selection"] for r in seeds[0]["selection"]))
    names = [(k, v) for k in a["transfer_ks"] for v in a["variants"]]
    progressive = [s["progressive"] for s in seeds if s.get("progressive")]
    lines = [
        *_synthetic_settings(results),
        *_synthetic_cycles(seeds),
        *_synthetic_selection(seeds, cores, selections),
        *(_synthetic_consensus(seeds, results["consensus"]) if "consensus" in results else []),
        *_synthetic_transfer(results, seeds, names),
        *(_matched(results["matched"]) if "matched" in results else []),
        *(_latent_matches(results["latent_matches"]) if "latent_matches" in results else []),
        *_synthetic_progressive(progressive),
    ]
    plots = synthetic_figures(folder, results, cores, selections, names, progressive)
    lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in plots]
    return _write(folder, lines)


def _synthetic_settings(results: dict) -> list[str]:
    identity, world = results["identity"], results["world"]
    a, sae, attribution = identity["synthetic"], identity["sae"], identity["attribution"]
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
        f"{attribution['attribution_tokens']} attribution rows); seeds {a['seeds']}; every cell is mean ± "
        f"standard deviation over seeds. A latent matches a feature when their directions' |cos| ≥ {a['match_cos']}.",
        "",
        f"Runtime: {sum(results.get('seconds', {}).values()) / 60:.1f} min for {len(a['seeds'])} seeds.",
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
    rows = []
    for k, variant in names:
        runs = [s["transfer"][f"k{k}-{variant}"] for s in seeds]
        cells = [
            spread_cell([r[c] for r in runs], 2 if c.startswith("l0") else 3)
            for c in ("mcc", "fvu", "l0", "l0_core", "task_loss_recovered")
        ]
        rows.append([k, variant, *cells, spread_cell(results["consistency"][f"k{k}-{variant}"])])
    header = ["k", "variant", "MCC", "FVU", "L0", "L0 core", "task loss recovered", "consistency"]
    lines = [
        "",
        "## Transferred SAEs (MCC against all true features)",
        "",
        "`consistency`: mean best-match |cos| between two seeds' decoders, over every pair of seeds.",
        "",
        *markdown_table(header, rows),
    ]
    if "matryoshka" not in results["identity"]["synthetic"]["variants"]:
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
    seeds = [results[f"seed{s}"] for s in results["identity"]["synthetic"]["seeds"]]
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


# -- the core-dynamics study ----------------------------------------------------------------------------------------
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
    return _write(folder, lines)


def _dynamics_curves(runs: list[dict]) -> list[str]:
    rows = []
    for r in sorted((r for r in runs if r["ablation"] == "paper"), key=lambda r: (r["budget"], r["core"], r["seed"])):
        curve = [(step, v / r["core_size"]) for step, v in r["l0_core_curve"]] if r["core_size"] else []
        m = r["metrics"]
        shares = ["–", "–", "–"]
        if curve:
            low = min(curve, key=lambda point: point[1])
            shares = [f"{low[1]:.3f} ({low[0]})", f"{curve[-1][1]:.3f}", f"{m['eval_l0_core']:.1f}"]
        held_out = [f"{m['eval_l0_noncore']:.1f}", f"{m['eval_fvu']:.4f}"]
        rows.append([r["budget"], r["core"], r["seed"], r["steps"], *shares, *held_out])
    header = ["budget", "core", "seed", "steps", "share min (at step)", "share end", "held-out L0 core"]
    return [
        "",
        "## Curves per budget and seed (the paper's settings)",
        "",
        *markdown_table([*header, "held-out L0 non-core", "held-out FVU"], rows),
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


# -- one study's reports in one folder ------------------------------------------------------------------------------
# -- the paper's claims ---------------------------------------------------------------------------------------------
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
    wide = sorted({m["k"] for m in models if m["variant"] == "matryoshka"} - set(identity["ClaimsArguments.ks"]))
    metrics = ["fvu", "ce_loss_recovered", "dead_fraction"]
    metrics += [c for _, _, c in HEADLINE_METRICS if any(c in m for m in models)]
    rows = [
        [m["k"], m["variant"], *(spread_cell(m.get(c, []), 2) for c in ("l0", "l0_core", "l0_noncore"))]
        + [spread_cell(m.get(c, [])) for c in metrics]
        for m in models
    ]
    lines = [
        "# The paper's claims on the embedded default",
        "",
        f"The distilled core `{results['core']['source']}` ({results['core']['size']} latents) transferred at "
        f"k {identity['ClaimsArguments.ks']} in every variant, and the Matryoshka SAE also at k "
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
        *markdown_table(["k", "variant", "L0", "L0 core", "L0 non-core", *metrics], rows),
        *_matched(
            results["matched"], "Claim 3 at matched sparsity: each variant − the Matryoshka SAE at the same measured L0"
        ),
        *(_latent_matches(results["latent_matches"]) if "latent_matches" in results else []),
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
    return _write(folder, lines)


def _matched(matched: dict, title: str = "Each variant − the Matryoshka SAE at the same measured L0") -> list[str]:
    deltas = list(dict.fromkeys(m for rows in matched.values() for row in rows.values() for m in row if m != "l0"))
    rows = []
    for variant in sorted(matched, key=VARIANTS.index):
        for k, row in sorted(matched[variant].items(), key=lambda item: int(item[0][1:])):
            cells = [f"{spread_cell(row[m])} ({len(row[m])})" if row.get(m) else "–" for m in deltas]
            rows.append([k[1:], variant, spread_cell(row["l0"], 1), *cells])
    return [
        "",
        f"## {title}",
        "",
        "The Matryoshka SAE's value at a model's measured global L0 is read off the same seed's Matryoshka curve "
        "(its models at every k), linear in log L0; outside that curve's L0 range there is no difference. In "
        "brackets: the seeds whose curve spans the model's L0. FVU and dead fraction: lower is better; the others: "
        "higher is better"
        + (
            ", but for sb_meta_fve (the share of the decoder's variance a meta-SAE explains: how composed of shared "
            "parts the latents are), whose better direction SAEBench leaves open."
            if "sb_meta_fve" in deltas
            else "."
        ),
        "",
        *markdown_table(["k", "variant", "measured L0", *(f"Δ {m}" for m in deltas)], rows),
    ]


def _latent_matches(matches: dict) -> list[str]:
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


def worlds_report(folder: str | Path) -> str:
    """The family of synthetic worlds: each world's settings, properties and headline results, then the benchmark's
    conclusions across the kept worlds (mean ± std over worlds, each world its mean over seeds; the shares of worlds
    where each difference has each sign) and what goes with attribution beating chance."""
    folder = Path(folder)
    results = read_json(
        folder / "results.json", {"identity": dict, **WORLDS_RESULTS, "across_worlds": dict}, RESULTS_REMEDY
    )
    family, base = results["identity"]["family"], results["identity"]["base"]
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
        f"rest as the base benchmark (seeds {base['seeds']}, {base['train_rows']} rows per SAE, transfer k "
        f"{base['transfer_ks']}, variants {', '.join(base['variants'])}). A world is kept when a plain Matryoshka "
        f"SAE (k {sorted(base['transfer_ks'])[len(base['transfer_ks']) // 2]}, seed 0) reaches MCC ≥ "
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
    return _write(folder, lines)


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
    return _write(folder, lines)
