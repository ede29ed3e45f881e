"""The scorers compared where their answers can be checked and where they cost (docs/results.md, "Scorers"): GxA,
latent ablation (q-quantile and mean over positions) and integrated gradients (`method.scorers`).

- In the synthetic world, whose useful features are known, each scorer runs the shipped distillation on every seed
  (`SyntheticBenchmark.distill`, the benchmark's settings otherwise), and each cycle's core and the distilled core
  are scored against the useful features (`SyntheticBenchmark.selection_scores`: R-precision of the pool's ranking,
  precision and recall of the core), with the seconds one scoring took.
- On the LM, one trained model (a finished distillation's last cycle) is scored by each scorer on the first
  `lm_tokens` positions of the run's attribution split, and by GxA on the whole split: each ranking's Spearman
  correlation with GxA's on the same positions and on the whole split, the Jaccard overlap of the cores they select
  at the run's τ, and the cost per latent and position. GxA on the same positions is integrated gradients with one
  step (the same value, `tests/test_attribution.py`), so that every scorer there sees the same sequences and masks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import spearmanr

from ..data.activations import ActivationArguments
from ..method.attribution import Attribution, AttributionArguments, jaccard, select_by_coverage
from ..method.scorers import SCORERS
from ..run.arguments import SAEArguments
from ..run.data import RunData
from ..run.results import SCORERS_RESULTS, StudyResults
from ..run.state import RunState, distilled_core_record
from ..run.trainer import DMSAETrainingArguments
from ..run.training import load_trained_model
from ..utils.integrity import file_sha256
from .arguments import StudyArguments, StudySourceArguments, study_identity
from .synthetic import SyntheticBenchmark
from .synthetic_world import SyntheticArguments

logger = logging.getLogger(__name__)


@dataclass
class ScorerStudyArguments:
    """Which scorers, where, and on how many LM positions."""

    scorers: list[str] = field(
        default_factory=lambda: ["gxa", "gxa:mean", "ablation", "ablation:mean", "integrated_gradients"],
        metadata={"help": f"Scorers, each `scorer` or `scorer:aggregation` (quantile or mean), of {SCORERS}."},
    )
    study_dir: str = field(default="runs/scorers", metadata={"help": "Folder of the synthetic distillations."})
    lm_tokens: int = field(default=512, metadata={"help": "Attribution positions every scorer scores on the LM."})

    def __post_init__(self):
        for spec in self.scorers:
            scorer, _, aggregation = spec.partition(":")
            if scorer not in SCORERS or aggregation not in ("", "quantile", "mean"):
                raise ValueError(f"scorers: {spec!r} is invalid: `scorer` or `scorer:aggregation`, scorer of {SCORERS}")
        if self.lm_tokens < 1:
            raise ValueError(f"lm_tokens={self.lm_tokens} is invalid: must be at least 1")


def scorer_arguments(attribution: AttributionArguments, spec: str) -> AttributionArguments:
    """The attribution arguments with `spec`'s scorer and aggregation (default: the q-quantile)."""
    scorer, _, aggregation = spec.partition(":")
    return dataclasses.replace(attribution, scorer=scorer, aggregation=aggregation or "quantile")


class ScorerStudy:
    """`run()` does what `results.json` lacks, saving after every distillation or scoring, and returns it."""

    def __init__(
        self,
        args: ScorerStudyArguments,
        source: StudySourceArguments,
        study: StudyArguments,
        sae: SAEArguments,
        activations: ActivationArguments,
        synthetic: SyntheticArguments,
        attribution: AttributionArguments,
        training: DMSAETrainingArguments,
    ):
        self.args, self.source, self.study = args, source.study_source, study
        self.sae_args, self.activation_args, self.synthetic_args = sae, activations, synthetic
        self.attribution_args, self.training_args = attribution, training
        self.results_dir = Path(study.results_dir or args.study_dir)
        self.results_path = self.results_dir / "results.json"

    def identity(self) -> dict:
        given = (self.sae_args, self.attribution_args)
        given += (self.synthetic_args,) if self.source == "synthetic" else (self.activation_args,)
        identity = {type(a).__name__: dataclasses.asdict(a) for a in given}
        if self.source == "synthetic":  # the seeds of its distillations
            identity["StudyArguments"] = study_identity(self.study)
        identity["AttributionArguments"] |= {"scorer": None, "aggregation": None}  # each run names its own
        identity["study"] = {"source": self.source, "lm_tokens": self.args.lm_tokens}
        identity["training"] = {k: getattr(self.training_args, k) for k in ("learning_rate", "seed")}
        if self.source == "lm":  # the scored model: the distillation's folder and its weights' digest
            folder = Path(self.training_args.output_dir)
            model = folder / f"cycle{distilled_core_record(folder)['last_cycle']}"
            identity["scored"] = {"model": str(model), "sha256": file_sha256(model / "model.safetensors")}
        return json.loads(json.dumps(identity, default=str))

    def run(self) -> dict:
        with StudyResults(self.results_path, self.identity(), SCORERS_RESULTS) as self.store:
            if self.source == "synthetic":
                self._synthetic(self.store.data)
            else:
                self._lm(self.store.data)
            return self.store.data

    def _save(self, results: dict) -> None:
        self.store.save()

    # -- the synthetic world ------------------------------------------------------------------------------------
    def _synthetic(self, results: dict) -> None:
        runs = results.setdefault("synthetic", {})
        world = None
        for spec in self.args.scorers:
            for seed in self.study.seeds:
                if str(seed) in runs.get(spec, {}):
                    continue
                training = dataclasses.replace(self.training_args, output_dir=f"{self.args.study_dir}/{spec}")
                attribution = scorer_arguments(self.attribution_args, spec)
                benchmark = SyntheticBenchmark(
                    self.study, self.synthetic_args, self.sae_args, attribution, training, world
                )
                world = benchmark.world
                logger.info("Synthetic world, scorer %s, seed %d", spec, seed)
                source = benchmark.source(seed)
                distillation = benchmark.distill(seed, source)
                cycles = distillation.state.data["cycles"]
                runs.setdefault(spec, {})[str(seed)] = {
                    "selection": [
                        r
                        for r in benchmark.selection_scores(distillation, source, seed)
                        if r["selection"] == "attribution"
                    ],
                    "scoring_seconds": [cycles[t]["stages"]["attribution"]["seconds"] for t in sorted(cycles)],
                    "scored_rows": cycles["0"]["stages"]["attribution"]["tokens"],
                    "carried_over": [cycles[t]["carried_over"] for t in sorted(cycles)],
                }
                self._save(results)

    # -- the LM ---------------------------------------------------------------------------------------------------
    def _lm(self, results: dict) -> None:
        folder = Path(self.training_args.output_dir)
        last = distilled_core_record(folder)["last_cycle"]
        state = RunState(folder, "distillation", {}, writer=True)  # the finished run's slices and statistics
        try:
            data = RunData(self.activation_args, self.training_args, state)
            model = load_trained_model(folder / f"cycle{last}").eval()
            lm = results.setdefault("lm", {"model": f"{folder}/cycle{last}", "pool": model.config.candidate_pool_size})
            batch = self.training_args.per_device_train_batch_size
            subsample = dataclasses.replace(self.attribution_args, scorer_tokens=self.args.lm_tokens)
            wanted = {"gxa (whole split)": scorer_arguments(self.attribution_args, "gxa")}
            for spec in self.args.scorers:
                a = scorer_arguments(subsample, spec)
                wanted[spec] = (
                    dataclasses.replace(a, scorer="integrated_gradients", ig_steps=1) if a.scorer == "gxa" else a
                )
            scored = lm.setdefault("scorers", {})
            for name, a in wanted.items():
                if name in scored:
                    continue
                attribution = Attribution(data, a, batch)
                started = time.perf_counter()
                scores = attribution.scores(model)
                seconds = time.perf_counter() - started
                pool, rows = model.config.candidate_pool_size, attribution.max_rows
                scored[name] = {
                    "scores": [round(float(v), 8) for v in scores],
                    "positions": rows,
                    "seconds": round(seconds, 2),
                    "ms_per_latent_position": round(1000 * seconds / (pool * rows), 5),
                }
                logger.info("LM scorer %s: %.1f s on %d positions", name, seconds, rows)
                self._save(results)
            lm["comparison"] = compare_rankings(scored, self.attribution_args.tau)
            self._save(results)
        finally:
            state.close()


def compare_rankings(scored: dict[str, dict], tau: float) -> dict[str, dict]:
    """Each scorer's Spearman correlation with GxA on the same positions and on the whole split, and the Jaccard
    overlap of the cores selected at `tau`."""
    scores = {name: torch.tensor(r["scores"]) for name, r in scored.items()}
    cores = {name: set(select_by_coverage(s, tau).indices.tolist()) for name, s in scores.items()}
    references = [name for name in ("gxa", "gxa (whole split)") if name in scores]
    return {
        name: {
            "core_size": len(cores[name]),
            **{f"spearman vs {ref}": float(spearmanr(s, scores[ref]).statistic) for ref in references},
            **{f"core jaccard vs {ref}": jaccard(cores[name], cores[ref]) for ref in references},
        }
        for name, s in scores.items()
    }
