"""Ground-truth benchmark: the shipped `Distillation` and `Transfer` in a synthetic world whose useful features are
known (the world, its task and its activation source: `studies.synthetic_world`).

The benchmark (`SyntheticBenchmark`) runs, per seed, the shipped distillation and transfer on it and keeps only the
scoring against the ground truth: each cycle's core and the distilled core against the useful features (precision,
recall and MCC, a latent matching a feature when their directions' |cos| ≥ `match_cos`) next to selection baselines
of the same size on the same model (random latents, latents by activation frequency, by mean squared activation: the
permutation coding of `progressive`); the transferred SAEs' MCC against all features, task loss recovered and
cross-seed consistency; and progressive coding, Matryoshka prefixes against a plain BatchTopK SAE reordered by mean
squared activation.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from pathlib import Path

from ..evaluation.consistency import consistency, latent_matches
from ..evaluation.progressive import latent_statistics, order_by, prefix_fvu
from ..method.attribution import AttributionArguments
from ..method.distillation import Distillation, DistillationArguments
from ..method.transfer import Transfer, TransferArguments, model_name
from ..model.core import DMSAECore
from ..model.modeling_dmsae import DMSAEModel
from ..run.arguments import SAEArguments, initial_model, new_model
from ..run.results import SYNTHETIC_RESULTS, StudyResults
from ..run.trainer import DMSAETrainingArguments
from ..run.training import load_trained_model, train_sae
from .arguments import StudyArguments, study_identity
from .claims import matched_differences
from .consensus import consensus_members
from .synthetic_world import (
    SyntheticArguments,
    SyntheticSource,
    SyntheticWorld,
    _seed_of,
    match_truth,
    matches,
    pool_rankings,
    r_precision,
    world_summary,
)

logger = logging.getLogger(__name__)


TRANSFER_METRICS = ("mcc", "fvu", "task_loss_recovered")
"""The transferred SAEs' metrics compared across variants."""


# ---------------------------------------------------------------------------------------------------------------
# Scoring against the ground truth


class SyntheticBenchmark:
    """All seeds' runs under `<output_dir>/seed{s}/` (`distillation/`, `transfer/`, `plain-batchtopk/`: resumable as
    any run); the scores in `results.json`, from which `reporting.synthetic.synthetic_report` writes `report.md`."""

    def __init__(
        self,
        study: StudyArguments,
        args: SyntheticArguments,
        sae: SAEArguments,
        attribution: AttributionArguments,
        training: DMSAETrainingArguments,
        world: SyntheticWorld | None = None,
    ):
        """`world`: `SyntheticWorld(args)` when a caller has built it already (its probe is fit at construction)."""
        self.study, self.args, self.sae_args = study, args, sae
        self.attribution_args, self.training_args = attribution, training
        if max(study.ks + study.matryoshka_ks) > sae.dict_size:
            raise ValueError(
                f"ks={study.ks} and matryoshka_ks={study.matryoshka_ks} are invalid: every k must be at most "
                f"dict_size={sae.dict_size}"
            )
        self.output_dir = Path(training.output_dir)
        self.results_path = Path(study.results_dir or self.output_dir) / "results.json"
        self.world = world or SyntheticWorld(args)

    def _training(self, folder: Path, seed: int) -> DMSAETrainingArguments:
        return dataclasses.replace(self.training_args, output_dir=str(folder), seed=seed, push_to_hub=False)

    def source(self, seed: int) -> SyntheticSource:
        return SyntheticSource(self.world, self.args.train_rows, self.args.eval_rows, seed)

    def distill(self, seed: int, source: SyntheticSource) -> Distillation:
        """The shipped distillation of one seed, run (or resumed) to its distilled core."""
        distillation = Distillation(
            DistillationArguments(num_cycles=self.args.num_cycles, model_repo=f"synthetic/dmsae-seed{seed}"),
            self.sae_args,
            None,
            self.attribution_args,
            self._training(self.output_dir / f"seed{seed}" / "distillation", seed),
            source=source,
        )
        distillation.run()
        distillation.state.close()
        return distillation

    def run_seed(self, seed: int) -> dict:
        """The shipped distillation and transfer for one seed, then their scores against the ground truth."""
        a = self.study
        folder = self.output_dir / f"seed{seed}"
        source = self.source(seed)
        repo = f"synthetic/dmsae-seed{seed}"
        distillation = self.distill(seed, source)
        transfer = Transfer(
            TransferArguments(
                core=str(folder / "distillation" / "distilled-core"),
                ks=a.ks,
                variants=a.variants,
                model_repo=repo,
            ),
            self.sae_args,
            None,
            self._training(folder / "transfer", seed),
            source=source,
        )
        transfer.run()
        transfer.state.close()
        results = dict(transfer.results)
        if a.matryoshka_ks:  # on the same rows: a synthetic slice is drawn by its seed and name
            wide = Transfer(
                TransferArguments(
                    core=transfer.args.core, ks=a.matryoshka_ks, variants=["matryoshka"], model_repo=repo
                ),
                self.sae_args,
                None,
                self._training(folder / "matryoshka-wide", seed),
                source=source,
            )
            results |= wide.run()
            wide.state.close()
        cycles = {
            t: {
                "size": c["size"],
                "carried_over": c["carried_over"],
                "coverage": c["coverage"],
                "l0_core": c.get("metrics", {}).get("eval_l0_core"),
            }
            for t, c in distillation.state.data["cycles"].items()
        }
        return {
            "cycles": cycles,
            "selection": self.selection_scores(distillation, source, seed),
            "transfer": results,
            "progressive": self.progressive_coding(folder, source, seed),
        }

    def selection_scores(self, distillation: Distillation, source: SyntheticSource, seed: int) -> list[dict]:
        """Each cycle's core and the distilled core against the useful features, with the baselines of its size on
        the same model."""
        truth = self.world.directions[self.world.useful]
        state = distillation.state.data
        last = state["distilled"]["last_cycle"]
        cores = [
            (f"cycle {t}", int(t), distillation.output_dir / record["core"])
            for t, record in sorted(state["cycles"].items(), key=lambda item: int(item[0]))
        ]
        cores.append(("distilled", last, distillation.output_dir / state["distilled"]["core"]))
        rows, models = [], {}
        for name, t, path in cores:
            if t not in models:  # the distilled core is scored on the last cycle's model, loaded once
                model = load_trained_model(distillation.output_dir / f"cycle{t}")
                models[t] = model, latent_statistics(model, source.eval_batches(4096))
            model, stats = models[t]
            core = DMSAECore.from_pretrained(path)
            rankings = pool_rankings(model, core, stats, _seed_of(seed, "random selection", name))
            decoder = model.W_dec.detach().float()
            useful = matches(decoder, truth, self.args.match_cos)
            ids = model.config.latent_ids()
            members = {ids.index(i) for i in core.latent_ids}  # C* ⊂ C^(T) is not a prefix of the ranking
            for selection, ranking in rankings.items():
                chosen = [i for i in ranking if i in members] if selection == "attribution" else ranking[: len(core)]
                rows.append(
                    {
                        "core": name,
                        "selection": selection,
                        "r_precision": r_precision(ranking, useful),
                        "pool_useful": float(useful[: model.config.candidate_pool_size].float().mean()),
                        **match_truth(decoder[chosen], truth, self.args.match_cos),
                    }
                )
        return rows

    def progressive_coding(self, folder: Path, source: SyntheticSource, seed: int) -> dict:
        """Prefix FVU at the Matryoshka group boundaries: the Matryoshka SAE at the middle k in its own order and
        reordered by mean squared activation, and a plain BatchTopK SAE (one group, same k and budget) in its
        own order and reordered by mean squared activation."""
        k = self.study.middle_k
        if "matryoshka" not in self.study.variants:
            return {}
        matryoshka = load_trained_model(folder / "transfer" / model_name(k, "matryoshka"))
        plain_folder = folder / "plain-batchtopk"
        if (plain_folder / "checksums.json").is_file():
            plain = load_trained_model(plain_folder)
        else:
            sae = dataclasses.replace(self.sae_args, k=k, group_fractions=[])
            plain = new_model(sae, source, seed=seed)
            train_sae(plain, source, source.training_slice("plain-batchtopk"), self._training(plain_folder, seed))
        prefixes = list(itertools.accumulate(matryoshka.config.group_sizes))
        curves = {}
        for name, model in (("matryoshka", matryoshka), ("plain_batchtopk", plain)):
            mean_squared = latent_statistics(model, source.eval_batches(4096))["mean_squared"]
            curves[f"{name} (own order)"] = prefix_fvu(model, source.eval_batches(4096), prefixes)
            curves[f"{name} (by mean squared activation)"] = prefix_fvu(
                model, source.eval_batches(4096), prefixes, order_by(mean_squared)
            )
        fvu = {name: [curve[g] for g in prefixes] for name, curve in curves.items()}
        return {"k": k, "prefixes": prefixes, "fvu": fvu}

    def run(self) -> dict:
        """Every seed (each resumes where it stopped), cross-seed consistency, the world's summary: `results.json`."""
        with StudyResults(self.results_path, self.identity(), SYNTHETIC_RESULTS) as store:
            return self._run(store)

    def _run(self, store: StudyResults) -> dict:
        results = store.data
        started = time.perf_counter()
        for seed in self.study.seeds:
            if f"seed{seed}" not in results:
                results[f"seed{seed}"] = self.run_seed(seed)
                results.setdefault("seconds", {})[f"seed{seed}"] = time.perf_counter() - started
                started = time.perf_counter()
                store.save()
        if "matryoshka" in self.study.variants:  # every variant against the Matryoshka curve at its measured L0
            transfers = {f"seed{s}": results[f"seed{s}"]["transfer"] for s in self.study.seeds}
            results["matched"] = matched_differences(transfers, self.study.variants, TRANSFER_METRICS)
        results["consistency"] = self.consistency()
        results["latent_matches"] = self.latent_matches()
        results["consensus"] = self.consensus()
        results["world"] = world_summary(self.world)
        store.save()
        self.results = results
        return results

    def identity(self) -> dict:
        identity = {
            "study": study_identity(self.study),
            "synthetic": dataclasses.asdict(self.args),
            "sae": dataclasses.asdict(self.sae_args),
            "attribution": dataclasses.asdict(self.attribution_args),
            "world": self.world.digest(),
        }
        return json.loads(json.dumps(identity, default=str))

    def consistency(self) -> dict[str, list[float]]:
        """Per transferred SAE, the consistency of every pair of seeds' decoders."""
        seeds = self.study.seeds
        pairs = list(itertools.combinations(seeds, 2))
        names = [model_name(k, v) for k in self.study.ks for v in self.study.variants]
        decoders = {(s, name): self.model(s, name).W_dec.detach() for s in seeds for name in names}
        return {name: [consistency(decoders[a, name], decoders[b, name]) for a, b in pairs] for name in names}

    def consensus(self) -> dict[str, list[dict]]:
        """What cycles buy, against consensus cores at the same number of trainings: for m of the seeds, each
        reference seed with each choice of m − 1 others, the reference's cycle-0 core latents selected in a majority
        of the m seeds' cycle-0 cores (`consensus_members`, matched at `latent_match_cos`), scored against the useful
        features like the cycles' cores (`match_truth`)."""
        truth = self.world.directions[self.world.useful]
        selected, seeds = {}, self.study.seeds
        for seed in seeds:
            folder = self.output_dir / f"seed{seed}" / "distillation"
            model = load_trained_model(folder / "cycle0")
            core = DMSAECore.from_pretrained(folder / "cycle0" / "core")
            ids = model.config.latent_ids()
            selected[seed] = model.W_dec.detach().float()[[ids.index(i) for i in core.latent_ids]]
        results = {}
        for m in range(2, len(seeds) + 1):
            scores = []
            for reference in seeds:
                others = [s for s in seeds if s != reference]
                for chosen in itertools.combinations(others, m - 1):
                    decoders = [selected[reference], *(selected[s] for s in chosen)]
                    members = consensus_members(decoders, self.study.latent_match_cos, m // 2 + 1)
                    if members:
                        scores.append(match_truth(selected[reference][members], truth, self.args.match_cos))
                    else:  # no latent selected in a majority
                        scores.append({"size": 0, "precision": None, "recall": 0.0, "mcc": None})
            results[f"consensus of {m}"] = scores
        return results

    def model(self, seed: int, name: str) -> DMSAEModel:
        return load_trained_model(self.output_dir / f"seed{seed}" / "transfer" / name)

    def latent_matches(self) -> dict:
        """The paper's claim 2 as the claims study measures it (`latent_matches` at `latent_match_cos`), across
        `ks` from the smallest and across seeds at the middle k."""
        a = self.study
        return latent_matches(
            lambda seed, k, variant: self.model(seed, model_name(k, variant)),
            initial_model,
            a.seeds,
            a.ks,
            a.middle_k,
            a.variants,
            a.latent_match_cos,
        )
