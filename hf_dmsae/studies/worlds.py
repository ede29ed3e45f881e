"""Ground truth over many worlds (`make worlds`): the synthetic benchmark's conclusions with their spread across
worlds drawn from stated ranges of the generator, not one world's.

World i's settings are drawn from `WorldFamilyArguments`' ranges (features per dimension, hierarchy roots and depth,
correlation scale, Zipf exponent, world seed) by the family seed and i; which features the task finds useful
cycles through `useful_by_turns` (at random, the frequent ones, the rare ones). A plain Matryoshka SAE screens each
world: below `mcc_floor` the world is skipped, and recorded so with its MCC. A kept world runs the whole
`SyntheticBenchmark` (every variant, every seed of the base settings) under `<family_dir>/world{i}/`, resumable as any
run.

`<results_dir>/results.json` holds, per world, its settings, its properties, its screening and its benchmark results
summarised (`summarise`), rewritten after each world, so that the family continues from it on another machine; and
the across-worlds statistics (`across_worlds`), from which `reporting.worlds.worlds_report` writes the report. Each
kept world's own `results.json` is copied to `<results_dir>/world{i}/` (`synthetic_report` writes its report there),
and its summary is made from that copy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args, get_type_hints

import torch

from ..method.attribution import AttributionArguments
from ..run.arguments import SAEArguments, new_model
from ..run.results import RESULTS_REMEDY, SYNTHETIC_RESULTS, WORLDS_RESULTS, StudyResults
from ..run.trainer import DMSAETrainingArguments
from ..run.training import load_trained_model, train_sae
from ..utils.integrity import read_json
from .arguments import StudyArguments, study_identity
from .claims import matched_differences
from .synthetic import TRANSFER_METRICS, SyntheticBenchmark
from .synthetic_world import SyntheticArguments, SyntheticSource, SyntheticWorld, world_summary

logger = logging.getLogger(__name__)

USEFUL_BY = get_args(get_type_hints(SyntheticArguments)["useful_by"])
"""How a world's useful features can relate to firing frequency (`SyntheticArguments.useful_by`)."""
SELECTIONS = ("attribution", "random", "frequency", "mean_squared")
"""The pool's rankings of the benchmark (`synthetic.pool_rankings`): attribution (GxA) and its baselines."""
PROPERTIES = ("features_per_dim", "useful_frequency_correlation", "pool_useful", "true_l0")
"""What might decide whether attribution beats chance, per world: superposition, how usefulness goes with firing
frequency, the candidate pool's share of latents matching a useful feature (random ranking's expected R-precision),
the true L0."""


@dataclass
class WorldFamilyArguments:
    """How many worlds, the ranges their settings are drawn from, and the screen a world must pass."""

    num_worlds: int = field(default=12, metadata={"help": "Worlds drawn."})
    family_seed: int = field(default=0, metadata={"help": "Seed of the draw of every world's settings."})
    features_per_dim_range: list[float] = field(
        default_factory=lambda: [1.0, 4.0],
        metadata={"help": "Range (min max) of true features per dimension (superposition); dict_size follows."},
    )
    root_features_range: list[int] = field(
        default_factory=lambda: [0, 8], metadata={"help": "Range of hierarchy roots (0: no hierarchy)."}
    )
    hierarchy_depth_range: list[int] = field(
        default_factory=lambda: [2, 3], metadata={"help": "Range of hierarchy depth."}
    )
    correlation_scale_range: list[float] = field(
        default_factory=lambda: [0.0, 0.3], metadata={"help": "Range of the features' low-rank correlation scale."}
    )
    zipf_exponent_range: list[float] = field(
        default_factory=lambda: [0.3, 1.2], metadata={"help": "Range of the Zipf exponent of firing probabilities."}
    )
    useful_by_turns: list[str] = field(
        default_factory=lambda: ["random", "frequent", "rare"],
        metadata={
            "help": f"How the useful features relate to firing frequency, world by world in turn: of {USEFUL_BY}."
        },
    )
    mcc_floor: float = field(
        default=0.5,
        metadata={
            "help": "MCC a plain Matryoshka SAE (the middle transfer k, seed 0) must reach for a world to count."
        },
    )
    family_dir: str = field(default="runs/worlds", metadata={"help": "Where every world's runs go."})

    def __post_init__(self):
        if self.num_worlds < 1:
            raise ValueError(f"num_worlds={self.num_worlds} is invalid: draw at least one world")
        for name in (
            "features_per_dim_range",
            "root_features_range",
            "hierarchy_depth_range",
            "correlation_scale_range",
            "zipf_exponent_range",
        ):
            bounds = getattr(self, name)
            if len(bounds) != 2 or bounds[0] > bounds[1] or bounds[0] < 0:
                raise ValueError(f"{name}={bounds} is invalid: give a range `min max` with 0 ≤ min ≤ max")
        if self.features_per_dim_range[0] <= 0 or self.hierarchy_depth_range[0] < 1:
            raise ValueError("features_per_dim_range must be positive and hierarchy_depth_range at least 1")
        if not self.useful_by_turns or not set(self.useful_by_turns) <= set(USEFUL_BY):
            raise ValueError(f"useful_by_turns={self.useful_by_turns} is invalid: give some of {USEFUL_BY}")
        if not 0 <= self.mcc_floor <= 1:
            raise ValueError(f"mcc_floor={self.mcc_floor} is invalid: must lie in [0, 1]")


def draw_world(family: WorldFamilyArguments, base: SyntheticArguments, index: int) -> dict:
    """World `index`'s settings: the fields of `SyntheticArguments` it changes (and the SAE's `dict_size`)."""
    draw = random.Random(f"world family {family.family_seed}/{index}")
    num_features = round(draw.uniform(*family.features_per_dim_range) * base.hidden_dim)
    return {
        "num_features": num_features,
        "root_features": draw.randint(*family.root_features_range),
        "hierarchy_depth": draw.randint(*family.hierarchy_depth_range),
        "correlation_scale": round(draw.uniform(*family.correlation_scale_range), 4),
        "zipf_exponent": round(draw.uniform(*family.zipf_exponent_range), 4),
        "world_seed": draw.randrange(2**31),
        "useful_by": family.useful_by_turns[index % len(family.useful_by_turns)],
        "dict_size": num_features,
    }


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            result[i] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (None below 3 points or for a constant)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return statistics.correlation(ranks(x), ranks(y))


def world_properties(world: SyntheticWorld) -> dict:
    """The world's superposition, how usefulness goes with firing frequency (Spearman over features), its true L0."""
    useful = torch.zeros(world.args.num_features)
    useful[world.useful] = 1.0
    return {
        "features_per_dim": world.args.num_features / world.args.hidden_dim,
        "useful_frequency_correlation": spearman(useful.tolist(), world.firing_frequencies.tolist()),
        **world_summary(world),
    }


def summarise(results: dict, seeds: list[int], variants: list[str]) -> dict:
    """One world's benchmark results, each value a list over seeds: per core (cycle 0, distilled) and selection, the
    R-precision and the core's precision; the pool's share of useful latents; the share of the previous core each
    later cycle selects again;
    per transferred SAE its metrics; per variant and k its difference from the Matryoshka SAE at matched L0."""
    runs = [results[f"seed{s}"] for s in seeds]
    selection = {}
    for run in runs:
        for row in run["selection"]:
            if row["core"] in ("cycle 0", "distilled"):
                cell = selection.setdefault(row["core"], {}).setdefault(row["selection"], {})
                cell.setdefault("r_precision", []).append(row["r_precision"])
                cell.setdefault("precision", []).append(row["precision"])
    pool_useful = [next(r["pool_useful"] for r in run["selection"] if r["core"] == "cycle 0") for run in runs]
    carried = {}
    for run in runs:
        for t, cycle in run["cycles"].items():
            if t != "0":  # the share of the previous core selected again
                carried.setdefault(t, []).append(cycle["carried_over"] / run["cycles"][str(int(t) - 1)]["size"])
    transfer = {}
    for run in runs:
        for name, result in run["transfer"].items():
            cell = transfer.setdefault(name, {"k": result["k"], "variant": result["variant"]})
            for metric in ("l0", *TRANSFER_METRICS):
                cell.setdefault(metric, []).append(result[metric])
    matched = matched_differences(
        {f"seed{s}": r["transfer"] for s, r in zip(seeds, runs, strict=True)}, variants, TRANSFER_METRICS
    )
    return {
        "selection": selection,
        "pool_useful": pool_useful,
        "carried_over": carried,
        "transfer": transfer,
        "matched": matched,
    }


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def signs(differences: list[float]) -> dict[str, float]:
    """The shares of worlds where a difference is positive, negative, or zero (|d| < 1e-9)."""
    n = len(differences)
    return {
        "positive": sum(d > 1e-9 for d in differences) / n,
        "negative": sum(d < -1e-9 for d in differences) / n,
        "zero": sum(abs(d) <= 1e-9 for d in differences) / n,
    }


def across_worlds(worlds: dict[str, dict]) -> dict:
    """Over the kept worlds, each world one value (its mean over seeds): per core and selection its R-precision and
    precision; attribution minus each baseline (per world, and the sign shares); per transferred SAE its metrics; per
    variant, k and metric the difference from Matryoshka at matched L0 and its sign shares; per later cycle the share
    of the core carried over and the share of worlds where every seed re-selected it whole; and the relation of
    attribution's cycle-0 R-precision, and of its lift over random, to each world property (Spearman over worlds)."""
    kept = {name: w for name, w in worlds.items() if w["kept"] and "summary" in w}
    summaries = {name: w["summary"] for name, w in kept.items()}
    selection, lifts = {}, {}
    for core in ("cycle 0", "distilled"):
        for method in SELECTIONS:
            for score in ("r_precision", "precision"):
                values = [_mean(s["selection"][core][method][score]) for s in summaries.values()]
                selection.setdefault(core, {}).setdefault(method, {})[score] = values
        for method in SELECTIONS[1:]:
            for score in ("r_precision", "precision"):
                pairs = zip(selection[core]["attribution"][score], selection[core][method][score], strict=True)
                differences = [a - b for a, b in pairs if a is not None and b is not None]
                lifts.setdefault(core, {}).setdefault(method, {})[score] = {
                    "differences": differences,
                    **({"signs": signs(differences)} if differences else {}),
                }
    transfer = {}
    for s in summaries.values():
        for name, cell in s["transfer"].items():
            row = transfer.setdefault(name, {"k": cell["k"], "variant": cell["variant"]})
            for metric in ("l0", *TRANSFER_METRICS):
                row.setdefault(metric, []).append(_mean(cell[metric]))
    matched = {}
    for s in summaries.values():
        for variant, by_k in s["matched"].items():
            for k, row in by_k.items():
                cell = matched.setdefault(variant, {}).setdefault(k, {})
                for metric in TRANSFER_METRICS:
                    if row.get(metric):
                        cell.setdefault(metric, []).append(_mean(row[metric]))
    for by_k in matched.values():
        for cell in by_k.values():
            for metric in list(cell):
                cell[f"{metric}_signs"] = signs(cell[metric])
    carried = {}
    for s in summaries.values():
        for t, shares in s["carried_over"].items():
            carried.setdefault(t, []).append(_mean(shares))
    whole_core = {t: sum(share > 1 - 1e-9 for share in shares) / len(shares) for t, shares in carried.items()}
    attribution = selection["cycle 0"]["attribution"]["r_precision"]
    lift = [
        a - r if a is not None and r is not None else None
        for a, r in zip(attribution, selection["cycle 0"]["random"]["r_precision"], strict=True)
    ]
    measured = {
        name: kept[name]["properties"] | {"pool_useful": _mean(s["pool_useful"])} for name, s in summaries.items()
    }
    properties = {p: [measured[name][p] for name in summaries] for p in PROPERTIES}
    relation = {}
    for p, values in properties.items():
        for target, ys in (("r_precision", attribution), ("lift_over_random", lift)):
            points = [(x, y) for x, y in zip(values, ys, strict=True) if x is not None and y is not None]
            relation.setdefault(p, {})[target] = spearman([x for x, _ in points], [y for _, y in points])
    return {
        "worlds": list(summaries),
        "selection": selection,
        "attribution_minus": lifts,
        "transfer": transfer,
        "matched": matched,
        "carried_over": carried,
        "whole_core_reselected": whole_core,
        "properties": properties,
        "attribution_r_precision": attribution,
        "attribution_lift": lift,
        "relation": relation,
    }


class WorldFamily:
    """The study; `run()` screens and benchmarks every world not yet recorded and writes `results.json`."""

    def __init__(
        self,
        family: WorldFamilyArguments,
        study: StudyArguments,
        base: SyntheticArguments,
        sae: SAEArguments,
        attribution: AttributionArguments,
        training: DMSAETrainingArguments,
    ):
        if len(study.seeds) < 2:
            raise ValueError(f"seeds={study.seeds} is invalid: every kept world runs at least 2 seeds")
        self.family, self.study, self.base, self.sae_args = family, study, base, sae
        self.attribution_args, self.training_args = attribution, training
        self.family_dir = Path(family.family_dir)
        self.results_path = Path(study.results_dir or family.family_dir) / "results.json"

    def identity(self) -> dict:
        """What the results depend on; worlds may be added (num_worlds) to a finished family."""
        family = {k: v for k, v in dataclasses.asdict(self.family).items() if k not in ("num_worlds", "family_dir")}
        parts = {"family": family, "study": study_identity(self.study), "base": dataclasses.asdict(self.base)}
        parts["sae"] = dataclasses.asdict(self.sae_args)
        parts |= {"attribution": dataclasses.asdict(self.attribution_args)}
        parts["training"] = {
            k: getattr(self.training_args, k) for k in ("learning_rate", "per_device_train_batch_size")
        }
        return json.loads(json.dumps(parts, default=str))

    def settings(self, index: int) -> tuple[SyntheticArguments, SAEArguments]:
        drawn = draw_world(self.family, self.base, index)
        sae = dataclasses.replace(self.sae_args, dict_size=drawn.pop("dict_size"))
        return dataclasses.replace(self.base, **drawn), sae

    def screen(self, world: SyntheticWorld, sae: SAEArguments, folder: Path) -> float:
        """The MCC of a plain Matryoshka SAE at the middle transfer k (seed 0) against every true feature."""
        source = SyntheticSource(world, self.base.train_rows, self.base.eval_rows, seed=0)
        if (folder / "checksums.json").is_file():
            model = load_trained_model(folder)
        else:
            model = new_model(dataclasses.replace(sae, k=self.study.middle_k), source, seed=0)
            training = dataclasses.replace(self.training_args, output_dir=str(folder), seed=0, push_to_hub=False)
            train_sae(model, source, source.training_slice("screen"), training)
        return source.downstream_metrics(model, 0)["mcc"]

    def run_world(self, index: int) -> dict:
        """Screen world `index` and, if kept, run the benchmark on it."""
        base, sae = self.settings(index)
        folder = self.family_dir / f"world{index}"
        started = time.perf_counter()
        world = SyntheticWorld(base)
        record = {"settings": draw_world(self.family, self.base, index), "properties": world_properties(world)}
        record["screen_mcc"] = self.screen(world, sae, folder / "screen")
        record["kept"] = record["screen_mcc"] >= self.family.mcc_floor
        if record["kept"]:
            training = dataclasses.replace(self.training_args, output_dir=str(folder / "benchmark"))
            study = dataclasses.replace(self.study, results_dir=None)  # each world's beside its runs
            SyntheticBenchmark(study, base, sae, self.attribution_args, training, world).run()
        else:
            logger.warning(
                "World %d skipped: plain Matryoshka MCC %.3f < %s", index, record["screen_mcc"], self.family.mcc_floor
            )
        record["seconds"] = time.perf_counter() - started
        return record

    def world_results(self, index: int) -> Path:
        return self.results_path.parent / f"world{index}" / "results.json"

    def run(self) -> dict:
        """Every world not yet recorded, in order, `results.json` after each; then each kept world's summary, from
        its own recorded results, and the across-worlds statistics."""
        with StudyResults(self.results_path, self.identity(), WORLDS_RESULTS) as store:
            return self._run(store)

    def _run(self, store: StudyResults) -> dict:
        results = store.data
        results.setdefault("worlds", {})
        for index in range(self.family.num_worlds):
            if f"world{index}" not in results["worlds"]:
                logger.info("World %d of %d", index + 1, self.family.num_worlds)
                results["worlds"][f"world{index}"] = self.run_world(index)
                store.save()
        worlds = {f"world{i}": results["worlds"][f"world{i}"] for i in range(self.family.num_worlds)}
        for index, record in enumerate(worlds.values()):
            if record["kept"]:
                if not self.world_results(index).is_file():  # kept beside the family's, for the world's own report
                    self.world_results(index).parent.mkdir(exist_ok=True)
                    benchmark = self.family_dir / f"world{index}" / "benchmark" / "results.json"
                    shutil.copyfile(benchmark, self.world_results(index))
                world = read_json(self.world_results(index), {"identity": dict, **SYNTHETIC_RESULTS}, RESULTS_REMEDY)
                record["summary"] = summarise(world, self.study.seeds, self.study.variants)
        results["across_worlds"] = across_worlds(worlds)
        results["mcc_floor"] = self.family.mcc_floor
        store.save()
        return results
