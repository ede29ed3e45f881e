"""Convergence in words and cells (`evaluation.convergence`): one line per model, a table cell, the mark a study's
tables give a model that did not converge, and the convergence sweep's report (`studies.convergence`)."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.convergence import CRITERIA
from ..run.results import CONVERGENCE_RESULTS, RESULTS_REMEDY
from ..utils.integrity import read_json
from . import figures
from .tables import markdown_table, write_report


def _number(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def convergence_line(record: dict) -> str:
    """`converged` or `not converged (unmet: …)`, then every diagnostic against its bound."""
    verdict = "converged" if record["converged"] else f"not converged (unmet: {', '.join(record['unmet'])})"
    measured = ", ".join(f"{name} {_number(record[name])} (< {bound})" for name, bound in CRITERIA.items())
    return f"{verdict}: {measured}; {record['steps']} steps, {record['tokens']} tokens, {record['epochs']} pass(es)"


def converged_cell(record: dict | None) -> str:
    """A table cell: ✓, ✗ with what was unmet, or – for a model trained before convergence was recorded."""
    if record is None:
        return "–"
    return "✓" if record["converged"] else "✗ " + ", ".join(record["unmet"])


def converged_of(records: list[dict | None]) -> str:
    """A cell for several models (one per seed): how many converged, `2/3`; – when none recorded it."""
    known = [r for r in records if r is not None]
    return "–" if not known else f"{sum(r['converged'] for r in known)}/{len(known)}"


def unconverged_warning(records: list[dict | None]) -> list[str]:
    """The lines a study's comparisons start with when some of its models did not converge (none if all did, or
    none recorded it)."""
    failed = [r for r in records if r is not None and not r["converged"]]
    if not failed:
        return []
    return [
        "",
        f"**{len(failed)} of {sum(r is not None for r in records)} models did not converge** (docs/method.md §7): the "
        "comparisons below are of SAEs that had not finished training, not a verdict on the method.",
    ]


UNCONVERGED_NOTE = (
    "A model marked ✗ did not converge (docs/method.md §7): its numbers are not a verdict on the method; – : trained "
    "before convergence was recorded."
)


def convergence_report(folder: str | Path) -> str:
    """The sweep: every model's diagnostics, the candidates' cross-seed matches and doubled budgets, the chosen
    setting, and the curves of the screening models."""
    folder = Path(folder)
    schema = {**CONVERGENCE_RESULTS, "models": CONVERGENCE_RESULTS["models?"], "screen_k": int}
    results = read_json(folder / "results.json", schema, RESULTS_REMEDY)
    models = results["models"]
    columns = ("heldout_fvu", "fvu_gain_last_fifth", "share_near_init", "dead_fraction", "overfit_gap")
    rows = [
        [
            m["setting"],
            m["variant"],
            m["k"],
            m["seed"],
            m["convergence"]["steps"],
            m["convergence"]["tokens"],
            *(_number(m["convergence"][c]) for c in columns),
            _number(m.get("ce_loss_recovered")),
            m["convergence"].get("resampled_latents", 0),
            _number(m.get("seconds")),
            converged_cell(m["convergence"]),
        ]
        for m in models.values()
    ]
    header = [
        "setting",
        "variant",
        "k",
        "seed",
        "steps",
        "tokens",
        *columns,
        "CE loss rec.",
        "resampled",
        "seconds",
        "converged",
    ]
    bounds = ", ".join(f"{name} < {bound}" for name, bound in CRITERIA.items())
    lines = [
        "# Convergence sweep on the embedded default",
        "",
        "Every setting trains the Matryoshka SAE and the dense-core DMSAE (random unit rows) at the screening k on "
        "seed 0; the cheapest settings whose every model converged are confirmed at every k and seed and at twice "
        f"their passes. Converged: every diagnostic below its bound ({bounds}).",
        "",
        *markdown_table(header, rows),
    ]
    if matched := results.get("matched"):
        lines += ["", "## Latents matched across the two seeds", ""]
        lines += markdown_table(
            ["model", "core", "non-core"], [[k, _number(m["core"]), _number(m["noncore"])] for k, m in matched.items()]
        )
    if twice := results.get("twice"):
        lines += ["", "## Twice the passes: relative held-out FVU gain", ""]
        lines += markdown_table(["model", "gain"], [[k, _number(t["fvu_gain"])] for k, t in twice.items()])
    chosen = results.get("chosen")
    lines += ["", "## Chosen", ""]
    if chosen is None:
        lines.append("Not yet: the sweep is under way.")
    elif chosen["setting"] is None:
        lines.append(f"None: {chosen['why']}.")
    else:
        lines.append(f"`{chosen['setting']}`: {chosen['overrides']}, {chosen['tokens']} training tokens a model.")
    first = results["identity"]["study"]["seeds"][0]
    screened = {key: m for key, m in models.items() if m["k"] == results["screen_k"] and m["seed"] == first}
    plot = figures.convergence_curves(screened, folder / "figures" / "convergence_curves.png")
    lines += ["", f"![held-out FVU and share near init against steps](figures/{plot.name})"]
    return write_report(folder, lines)
