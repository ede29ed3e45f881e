"""The paper's claims measured on one finished distillation (`make study`): its distilled core transferred at several
k in every variant (dense- and sparse-core DMSAE, the Matryoshka SAE, and the paper's random-init control in both
modes), over seeds, each seed's variants on the same tokens; then

- claim 3 at matched sparsity: every metric of a variant against the Matryoshka SAE of the same seed at the same
  *measured* global L0, read off the Matryoshka SAE's curve by linear interpolation in log L0 (the Matryoshka SAE is
  also trained at `matryoshka_ks`, so its curve spans the dense-core models' higher L0; outside it, no difference);
- claim 2 (`evaluation.consistency.latent_matches`): the share of a model's latents that have a match (decoder
  cosine ≥ `match_cos`) in the same variant's models at the larger ks, of the same seed and of the others (a seed's
  models share their initialization, so the share of latents still at it is measured too), and in the other seeds'
  models at `consistency_k`, core and non-core latents apart.

Every (seed, k, variant) is an ordinary resumable transfer run under `<study_dir>/seed{s}/`, so re-running resumes.
`<results_dir>/results.json` (committed by `make study`) holds every model's metrics (SAEBench's too, once run) and
the comparisons, rewritten after each, so that a study continues on another machine from its committed results:
nothing recorded is redone, and a seed's runs are trained again (as they were) only where something left to do
reads them (their SAEBench, or the comparison of latents of a variant added, or of every variant when seeds are).
`reporting.claims.claims_report` writes `report.md` beside it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..data.activations import ActivationArguments
from ..evaluation.consistency import cores_overlap, latent_matches
from ..evaluation.saebench import HEADLINE_METRICS, SAEBenchArguments
from ..method.distillation import control_cores
from ..method.transfer import Transfer, TransferArguments, model_name
from ..model.core import DMSAECore
from ..model.modeling_dmsae import DMSAEModel
from ..run.arguments import SAEArguments, initial_model
from ..run.results import CLAIMS_RESULTS, StudyResults
from ..run.state import arguments_identity, distilled_core_record, load_recorded_core
from ..run.trainer import DMSAETrainingArguments
from ..run.training import load_trained_model
from ..run.variants import VARIANT_SETTINGS, Variant
from ..utils.checks import check_ranges
from .arguments import StudyArguments

COMPARED_METRICS = ("fvu", "ce_loss_recovered", "dead_fraction", *(c for _, _, c in HEADLINE_METRICS))
"""The metrics compared at matched L0 (those a model lacks, e.g. an SAEBench eval not run, are left out)."""


@dataclass
class ClaimsArguments:
    """Which distillation, where its transfers go, and at which k seeds are compared (the seeds, variants and ks are
    `StudyArguments`)."""

    distillation_dir: str = field(
        default="runs/smollm2-135m-l15",
        metadata={
            "help": "A finished distillation, whose distilled core is moved; `{seed}` becomes the seed, so that each "
            "seed transfers its own distillation's core, and the cores are compared across seeds."
        },
    )
    study_dir: str = field(default="runs/study", metadata={"help": "Where the study's transfer runs go."})
    consistency_k: int = field(default=32, metadata={"help": "The k at which seeds are compared."})
    on_control_slice: bool = field(
        default=False,
        metadata={
            "help": "Train each seed's transfers on its distillation's control slice: tokens disjoint from its "
            "attribution split and from every cycle's slice (`TransferArguments.control_slice_of`)."
        },
    )

    def __post_init__(self):
        check_ranges(self, consistency_k=">= 1")


class PaperClaims:
    """The study; `run()` trains what is missing, compares, and writes `results.json`."""

    def __init__(
        self,
        args: ClaimsArguments,
        study: StudyArguments,
        sae: SAEArguments,
        activations: ActivationArguments,
        training: DMSAETrainingArguments,
        saebench: SAEBenchArguments | None = None,
    ):
        if "matryoshka" not in study.variants:
            raise ValueError(f"variants={study.variants} is invalid: every comparison is against 'matryoshka'")
        if args.consistency_k not in study.ks:
            raise ValueError(f"consistency_k={args.consistency_k} is invalid: it must be one of ks={study.ks}")
        self.args, self.study, self.sae_args, self.activation_args = args, study, sae, activations
        self.training_args, self.saebench_args = training, saebench
        self.study_dir = Path(args.study_dir)
        self.results_dir = Path(study.results_dir or args.study_dir)
        self.per_seed = "{seed}" in args.distillation_dir
        self.cores = {seed: self.distilled(seed) for seed in study.seeds}  # seed: (its folder, the core)
        self.core_path, self.core = self.cores[study.seeds[0]]

    def distillation(self, seed: int) -> Path:
        """The distillation whose core the seed's models are built around."""
        return Path(self.args.distillation_dir.format(seed=seed))

    def distilled(self, seed: int) -> tuple[Path, DMSAECore]:
        folder = self.distillation(seed)
        record = distilled_core_record(folder)
        return folder / record["core"], load_recorded_core(folder, record)

    def last_model_folder(self, seed: int) -> Path:
        """The seed's distillation's last cycle, whose trained latents the `trained_*` controls are built around."""
        return self.distillation(seed) / f"cycle{distilled_core_record(self.distillation(seed))['last_cycle']}"

    def transfers(self, seed: int) -> list[Transfer]:
        """The seed's transfer runs: every variant at the study's ks, and the Matryoshka SAE at `matryoshka_ks`."""
        grids = [("transfer", self.study.ks, self.study.variants)]
        if self.study.matryoshka_ks:
            grids.append(("matryoshka-wide", self.study.matryoshka_ks, ["matryoshka"]))
        runs = []
        trained = any(Variant.parse(v).core == "trained" for v in self.study.variants)
        for name, ks, variants in grids:
            folder = self.study_dir / f"seed{seed}" / name
            training = dataclasses.replace(self.training_args, seed=seed, output_dir=str(folder), push_to_hub=False)
            transfer = TransferArguments(
                core=str(self.cores[seed][0]),
                ks=ks,
                variants=variants,
                ce_batches=self.study.ce_batches,
                control_model=str(self.last_model_folder(seed)) if trained else None,
                control_slice_of=str(self.distillation(seed)) if self.args.on_control_slice else None,
            )
            runs.append(Transfer(transfer, self.sae_args, self.activation_args, training, self.saebench_args))
        return runs

    def identity(self) -> dict:
        """What the results depend on; seeds, variants and Matryoshka ks may be added to a finished study. The core
        enters by its size (its rows by `check_same_core`), the settings of `VARIANT_SETTINGS` per variant
        (`variant_settings`)."""
        arguments = (self.sae_args, self.activation_args, self.training_args, self.args, self.study)
        arguments += (self.saebench_args,)
        arguments = tuple(a for a in arguments if a is not None)
        exclude = ("DMSAETrainingArguments.seed", "seeds", "variants", "matryoshka_ks")
        exclude += ("study_dir", "results_dir", "distillation_dir", *(f"SAEArguments.{n}" for n in VARIANT_SETTINGS))
        identity = arguments_identity(*arguments, exclude=exclude)
        if not self.per_seed:  # one core for every seed; each seed's own is checked by `check_same_core`
            identity["inputs.core_size"] = len(self.core)
        return json.loads(json.dumps(identity, default=str))

    def run(self) -> dict:
        """Phase by phase, so that the comparisons of the package's own metrics over every seed come before SAEBench
        (the longest part): every seed's models; the latents' matches; SAEBench on every model, seed by seed.
        `results.json` is rewritten after every model and comparison, and what it holds is never redone: a study
        continues from it on another machine, where a seed's runs are trained again (as they were) only where what
        is left to do reads them (`recorded_for_good`)."""
        main = self.training_args.process_index == 0
        with StudyResults(self.results_dir / "results.json", self.identity(), CLAIMS_RESULTS, writer=main) as store:
            return self._run(store, main)

    def _run(self, store: StudyResults, main: bool) -> dict:
        results = store.data
        results.setdefault("models", {})
        results["variant_settings"] = self.variant_settings(results, store.recorded_identity)
        self.check_same_core(results)
        for seed in self.study.seeds if self.per_seed else []:
            recorded = results.setdefault("cores", {}).get(f"seed{seed}", {})
            path, core = self.cores[seed]
            digest = recorded.get("digest", core.digest())  # the core the seed's models read
            results["cores"][f"seed{seed}"] = {"source": str(path), "size": len(core), "digest": digest}
        if not self.per_seed:
            digest = results.get("core", {}).get("digest", self.core.digest())  # the core the study's models read
            results["core"] = {"source": str(self.core_path), "size": len(self.core), "digest": digest}

        def save() -> None:
            results["matched"] = matched_differences(results["models"], self.study.variants)
            store.save()

        for seed in self.study.seeds:
            models = results["models"].setdefault(f"seed{seed}", {})

            def keep(name: str, record: dict, models=models) -> None:
                if name not in models:  # a model trained before this study's last save is recorded once
                    models[name] = dict(record)
                    save()

            if to_train := self.models_to_train(seed, results):
                skip = set(models) - set(to_train)
                for transfer in self.transfers(seed):  # every process: training may be distributed
                    transfer.train(after_each=keep, skip=skip)
                    for name, record in transfer.results.items():
                        keep(name, record)
                    transfer.state.close()
        if not main:
            return results
        if self.per_seed and results.get("core_overlap", {}).get("seeds") != self.study.seeds:
            results["core_overlap"] = self.core_overlap()
            save()
        if unmatched := self.unmatched_variants(results):
            a, k = self.study, self.args.consistency_k
            matches = latent_matches(self.model, initial_model, a.seeds, a.ks, k, unmatched, a.latent_match_cos)
            if unmatched != a.variants:  # the variants compared before are kept
                matches["variants"] = results["latent_matches"]["variants"] | matches["variants"]
            results["latent_matches"] = matches
            save()
        if not self.saebench_asked:
            return results
        for seed in self.study.seeds:
            models = results["models"][f"seed{seed}"]

            def replace(name: str, record: dict, models=models) -> None:
                models[name] = dict(record)
                save()

            if all("saebench" in record for record in models.values()):
                continue
            for transfer in self.transfers(seed):
                for name, record in transfer.results.items():
                    if "saebench" in models[name]:  # done on another machine: recorded, not redone
                        record.update(models[name])
                transfer.run_saebench(after_each=replace)
                transfer.state.close()
        return results

    def core_overlap(self) -> dict:
        """The first claim's consistency: for every ordered pair of seeds, the share of one seed's distilled core
        whose encoder direction has a match (cosine ≥ `latent_match_cos`) in the other's, against the same share
        for each seed's `random_trained` control core (as many trained latents of its last cycle outside its core)."""
        seeds, cos = self.study.seeds, self.study.latent_match_cos
        controls = []
        for seed in seeds:
            core = self.cores[seed][1]
            last = load_trained_model(self.last_model_folder(seed))
            controls.append(control_cores(core, core.encoder_rows.shape[1], seed, last)["random_trained"])
        return {
            "seeds": list(seeds),
            "match_cos": cos,
            "sizes": [len(self.cores[seed][1]) for seed in seeds],
            "distilled": cores_overlap([self.cores[seed][1].encoder_rows for seed in seeds], cos),
            "random_trained": cores_overlap([c.encoder_rows for c in controls], cos),
        }

    @property
    def saebench_asked(self) -> bool:
        return self.saebench_args is not None and bool(self.saebench_args.saebench_evals)

    def model_variants(self) -> dict[str, str]:
        """A seed's models: their names (their folders under its transfer runs) and variants."""
        grid = [(k, v) for k in self.study.ks for v in self.study.variants]
        grid += [(k, "matryoshka") for k in self.study.matryoshka_ks]
        return {model_name(k, variant): variant for k, variant in grid}

    def unfinished(self, seed: int, results: dict) -> bool:
        """Whether anything of the seed is left to do: a model, an SAEBench result or the comparison of latents."""
        models = results["models"].get(f"seed{seed}", {})
        return bool(self.unmatched_variants(results)) or any(
            name not in models or (self.saebench_asked and "saebench" not in models[name])
            for name in self.model_variants()
        )

    def check_same_core(self, results: dict) -> None:
        """Refuse to train a model around a seed's distilled core's rows if its models were built around another
        core (a distillation run again need not select the same latents). The Matryoshka SAE, the random-core
        controls and the learned block read the core's size alone, so they may still be added."""
        reading: dict[tuple, list[str]] = {}  # (recorded digest, core path, its digest now): the models reading it
        for seed in self.study.seeds:
            path, core = self.cores[seed]
            recorded = results.get("cores", {}).get(f"seed{seed}") if self.per_seed else results.get("core")
            recorded, digest = (recorded or {}).get("digest"), core.digest()
            if recorded is None or recorded == digest:
                continue
            reading.setdefault((recorded, path, digest), []).extend(
                f"seed{seed}/{name}"
                for name, variant in self.models_to_train(seed, results).items()
                if Variant.parse(variant).core == "distilled"
            )
        problems = [
            f"the study's models were built around core {recorded}, and {path} is {digest}: {', '.join(names)} "
            "would be trained around another core"
            for (recorded, path, digest), names in reading.items()
            if names
        ]
        if problems:
            raise ValueError(f"{'; '.join(problems)}; use another --results_dir")

    def variant_settings(self, results: dict, recorded_identity: dict) -> dict[str, dict]:
        """The `VARIANT_SETTINGS` each variant's models read: those recorded (for models recorded before they were
        kept per variant, the study's), and the given ones for a variant with models to train. Given settings that
        differ from a study variant's recorded ones are refused: they would train its models left to train
        differently, or be silently ignored by its finished ones."""
        recorded = dict(results.get("variant_settings", {}))
        for models in results["models"].values():
            for record in models.values():
                if record["variant"] not in recorded and (own := self.settings_of(record["variant"])):
                    recorded[record["variant"]] = {n: recorded_identity.get(f"SAEArguments.{n}") for n in own}
        conflicts = []
        for seed in self.study.seeds:
            for name, variant in self.models_to_train(seed, results).items():
                own = self.settings_of(variant)
                if own and recorded.setdefault(variant, own) != own:
                    conflicts.append(f"seed{seed}/{name} (recorded {recorded[variant]}, now {own})")
        if conflicts:
            raise ValueError(
                f"the study's models of a variant would be trained at other settings: {', '.join(conflicts)}; "
                "use another --results_dir"
            )
        finished = [
            f"{variant} (recorded {recorded[variant]}, now {own})"
            for variant in self.study.variants
            if (own := self.settings_of(variant)) and recorded.get(variant, own) != own
        ]
        if finished:
            raise ValueError(
                f"the study's finished models were trained at other settings: {', '.join(finished)}; they are not "
                "trained again, so give their recorded settings, or use another --results_dir"
            )
        return recorded

    def settings_of(self, variant: str) -> dict:
        """The given `VARIANT_SETTINGS` that a variant's models read."""
        return {name: getattr(self.sae_args, name) for name in Variant.parse(variant).settings}

    def models_to_train(self, seed: int, results: dict) -> dict[str, str]:
        """The seed's models `run()` trains (name: variant): none if nothing of the seed is left to do, else those
        not `recorded_for_good`."""
        if not self.unfinished(seed, results):
            return {}
        skip = self.recorded_for_good(results["models"].get(f"seed{seed}", {}), results)
        return {name: variant for name, variant in self.model_variants().items() if name not in skip}

    def recorded_for_good(self, models: dict, results: dict) -> set[str]:
        """A seed's recorded models that nothing left to do reads again (their SAEBench is done or not asked, their
        variant's latents are compared): a study extended by a variant or a Matryoshka k trains those models alone."""
        unmatched = self.unmatched_variants(results)
        return {
            name
            for name, record in models.items()
            if record["variant"] not in unmatched and (not self.saebench_asked or "saebench" in record)
        }

    def unmatched_variants(self, results: dict) -> list[str]:
        """The study's variants whose latents the results do not compare: every one for other seeds, else those
        added since."""
        matches = results.get("latent_matches", {})
        if matches.get("seeds") != self.study.seeds:
            return list(self.study.variants)
        return [v for v in self.study.variants if v not in matches["variants"]]

    def model(self, seed: int, k: int, variant: str) -> DMSAEModel:
        return load_trained_model(self.study_dir / f"seed{seed}" / "transfer" / model_name(k, variant))


END_TOLERANCE = 0.02
"""How far (relative, in L0) beyond the Matryoshka curve's ends a model still takes the end's value: BatchTopK's
measured L0 differs from k by a few hundredths either way, so a model at the curve's smallest k often lies just below
it."""


def interpolate_in_log_l0(points: list[tuple[float, float]], l0: float) -> float | None:
    """The value at `l0` on the curve through `points` ((L0, value), any order), linear in log L0; within
    `END_TOLERANCE` beyond an end, the end's value; None farther out (no extrapolation)."""
    points = sorted(points)
    if not points:
        return None
    (first, at_first), (last, at_last) = points[0], points[-1]
    if first * (1 - END_TOLERANCE) <= l0 < first:
        return at_first
    if last < l0 <= last * (1 + END_TOLERANCE):
        return at_last
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= l0 <= x1:
            t = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return y0 + t * (y1 - y0)
    return None


def matched_differences(
    models: dict[str, dict], variants: list[str], metrics: tuple[str, ...] = COMPARED_METRICS
) -> dict:
    """Per variant other than Matryoshka, k and metric: its value minus the same seed's Matryoshka SAE at the same
    measured L0 (one per seed whose Matryoshka curve spans it), and the measured L0s."""
    matched = {}
    for variant in (v for v in variants if v != "matryoshka"):
        for results in models.values():
            reference = [r for r in results.values() if r["variant"] == "matryoshka"]
            for result in (r for r in results.values() if r["variant"] == variant):
                row = matched.setdefault(variant, {}).setdefault(f"k{result['k']}", {"l0": []})
                row["l0"].append(result["l0"])
                for metric in metrics:
                    points = [(r["l0"], r[metric]) for r in reference if metric in r]
                    if metric in result and (at := interpolate_in_log_l0(points, result["l0"])) is not None:
                        row.setdefault(metric, []).append(result[metric] - at)
    return matched
