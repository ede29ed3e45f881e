"""The distillation cycles (Algorithm 1), the distilled core (Eq. 8) and the controls (Fig. 3); docs/method.md §4.

Cycle 0 is a plain SAE (a dictionary_learning Matryoshka checkpoint or a SAELens SAE, local or on the Hub, or a
Matryoshka SAE trained here); cycle t ≥ 1 is a new DMSAE whose frozen core rows are the encoder rows selected in
cycle t−1, everything else reinitialised.
Each cycle trains on its own slice of the token stream (fresh tokens, disjoint from every other slice), with the same
non-core BatchTopK target `k_noncore`, and is scored on the attribution split, which no cycle trains on. The distilled
core is `C^(T) ∩ C^(T−1)` by latent id.

The controls train, on one more slice and for each of `control_seeds`, the distilled core and two cores of the same
size: `random_init`, random unit rows (the paper's control, "a randomly initialized core of the same size") and
`random_trained`, trained latents of the last cycle outside the distilled core (a stronger control). Their
`E[L0_core]` over training is the paper's Fig. 3; they are not scored.

The run lives in one output folder: `cycle{t}/` (the Trainer's output: checkpoints, the model, `core/`), `control/`,
`cache/`, `repos/` (each artifact as a complete local repo, written when publishing), `figures/`, `state.json`
(identity, slices, what is done) and `report.md`. Re-running the same command resumes where a crash stopped it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..data.activations import ActivationArguments
from ..data.language_model import lm_width
from ..evaluation.held_out import activation_metrics
from ..model.core import DMSAECore
from ..model.modeling_dmsae import DMSAEModel
from ..publishing.formats import check_checkpoint_fits, checkpoint_weights, load_cycle0
from ..publishing.hub import (
    check_push_token,
    check_repo_id,
    core_repo_name,
    default_model_repo,
    publish_all,
    repo_folder,
    resolve_folder,
    write_core_repo,
    write_model_repo,
)
from ..run.arguments import SAEArguments, k_noncore_for, new_model
from ..run.data import ActivationSource, open_source
from ..run.state import RunState, arguments_identity, carry_over, load_recorded_core
from ..run.trainer import DMSAETrainingArguments
from ..run.training import load_trained_model, train_sae, training_steps
from ..utils.checks import check_ranges
from ..utils.integrity import file_sha256
from ..utils.stages import StageTimes, stage
from .attribution import Attribution, AttributionArguments, AttributionCallback, jaccard

logger = logging.getLogger(__name__)

CONTROL_CORES = ("distilled", "random_init", "random_trained")


@dataclass
class DistillationArguments:
    """The train-and-select cycles and the controls."""

    num_cycles: int = field(default=2, metadata={"help": "Cycles T after cycle 0; the distilled core needs T ≥ 1."})
    cycle0_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "SAE used as cycle 0: a dictionary_learning Matryoshka checkpoint (ae.pt, config.json) or a "
            "SAELens SAE (cfg.json, sae_weights.safetensors; standard, TopK or JumpReLU), as a local folder or "
            "a Hub repo id org/name[/subfolder][@revision]."
        },
    )
    cycle0_k: int | None = field(
        default=None,
        metadata={"help": "BatchTopK target that scores a SAELens JumpReLU or standard cycle 0 (they record no k)."},
    )
    random_core_control: bool = field(
        default=False,
        metadata={
            "help": "Also train the distilled core, random unit rows and random trained latents side by side "
            "(Fig. 3), on a slice of their own."
        },
    )
    control_seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds of the controls."})
    stop_cycles_at_overlap: float = field(
        default=0.0,
        metadata={
            "help": "End the distillation early once a cycle's core has this Jaccard overlap with the one "
            "before (0: run all cycles)."
        },
    )
    model_repo: str | None = field(
        default=None,
        metadata={"help": "Repo name of the run's model, e.g. org/dmsae-gemma2-2b-l12 (default: derived)."},
    )

    def __post_init__(self):
        if self.num_cycles < 1:
            raise ValueError(f"num_cycles={self.num_cycles} is invalid: the distilled core needs at least 1 cycle")
        if not 0.0 <= self.stop_cycles_at_overlap <= 1.0:
            raise ValueError(f"stop_cycles_at_overlap={self.stop_cycles_at_overlap} is invalid: must lie in [0, 1]")
        check_ranges(self, cycle0_k=">= 1", control_seeds=">= 0")
        if self.random_core_control and not self.control_seeds:
            raise ValueError("random_core_control needs at least one control seed")
        if self.model_repo is not None:
            check_repo_id(self.model_repo, "model_repo")


def random_core_generator(seed: int) -> torch.Generator:
    """The random stream of a control seed's random core rows. Not `manual_seed(seed)`: models initialised under
    that seed draw the same directions (a cycle-0 latent would come back as a "random" row); a stream of its own keeps
    the rows independent of every model's initialisation."""
    stream = int.from_bytes(hashlib.sha256(f"random core rows {seed}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(stream)


def random_core(
    like: DMSAECore, d_in: int, generator: torch.Generator, remove: torch.Tensor | None = None
) -> DMSAECore:
    """`len(like)` random unit rows (ids `random:i`), drawn as the tied initialisation draws directions; with
    `remove` (`[m, d_in]` orthonormal rows), the rows are drawn in the orthogonal complement of those directions."""
    rows = torch.randn(len(like), d_in, generator=generator)
    if remove is not None:
        rows -= (rows @ remove.T) @ remove
    return dataclasses.replace(
        like,
        encoder_rows=rows / rows.norm(dim=1, keepdim=True),
        latent_ids=[f"random:{i}" for i in range(len(like))],
        scores=torch.zeros(len(like)),
    )


def control_cores(
    distilled: DMSAECore, d_in: int, seed: int, last_model: DMSAEModel | None = None
) -> dict[str, DMSAECore]:
    """A seed's control cores, each as many rows as `distilled`: random unit rows (`random_init`, the paper's) and,
    given the last cycle's model, as many of its trained latents outside the distilled core (`random_trained`),
    drawn in that order from the seed's stream (`random_core_generator`), so that every run naming a seed's controls
    (the distillation's, a transfer's) holds the same rows."""
    generator = random_core_generator(seed)
    cores = {"random_init": random_core(distilled, d_in, generator)}
    if last_model is not None:
        ids = last_model.config.latent_ids()
        outside = [j for j, i in enumerate(ids) if i not in set(distilled.latent_ids)]
        picked = [outside[j] for j in torch.randperm(len(outside), generator=generator)[: len(distilled)]]
        cores["random_trained"] = dataclasses.replace(
            distilled,
            encoder_rows=last_model.W_enc[picked].detach().clone(),
            latent_ids=[ids[j] for j in picked],
            scores=torch.zeros(len(picked)),
        )
    return cores


class Distillation:
    """One distillation run; `run()` does every remaining step and returns the distilled core."""

    def __init__(
        self,
        distillation: DistillationArguments,
        sae: SAEArguments,
        activations: ActivationArguments | None,
        attribution: AttributionArguments,
        training: DMSAETrainingArguments,
        *,
        source: ActivationSource | None = None,
    ):
        """`activations` name the LM and text the run reads (`RunData`, the LM's next-token loss for attribution);
        or `source` gives the activations and the attribution objective itself (e.g. `synthetic.SyntheticSource`)."""
        if (activations is None) == (source is None):
            raise ValueError("give either activations (an LM and a text dataset) or a source, not both")
        if source is not None and distillation.cycle0_checkpoint:
            raise ValueError("cycle0_checkpoint is read at an LM's hook: it needs activations, not a source")
        self.args, self.sae_args, self.activation_args = distillation, sae, activations
        self.attribution_args, self.training_args, self.source = attribution, training, source
        check_push_token(training.push_to_hub, training.hub_token)
        if activations is not None:  # the budget holds the steps asked for, before the run's folder records anything
            training_steps(activations.num_tokens, training)
        self.output_dir = Path(training.output_dir)
        self.k_noncore = k_noncore_for(sae, reference_core_size=0)  # every cycle is compared with cycle 0
        identity = arguments_identity(
            *(a for a in (distillation, sae, activations, attribution, training) if a is not None),
            exclude=("model_repo", "random_core_control", "control_seeds", "cycle0_checkpoint"),
        )
        self.cycle0 = None
        if distillation.cycle0_checkpoint:  # checked whole now (against the LM's config too), before any harvesting
            self.cycle0 = resolve_folder(distillation.cycle0_checkpoint, token=training.hub_token)
            check_checkpoint_fits(self.cycle0, activations, lm_width(activations))
            load_cycle0(self.cycle0, k=distillation.cycle0_k)  # shapes, k and finiteness of every weight
            identity["inputs.cycle0_checkpoint"] = file_sha256(checkpoint_weights(self.cycle0))
        self.state = RunState(self.output_dir, "distillation", identity, writer=training.process_index == 0)
        self.model_repo = check_repo_id(
            distillation.model_repo
            or training.hub_model_id
            or (default_model_repo(activations) if source is None else source.default_repo),
            "model_repo",
        )
        self.state.data.update(model_repo=self.model_repo, k_noncore=self.k_noncore)  # for the report
        self.state.save()

    @cached_property
    def data(self) -> ActivationSource:
        """The activations: the LM's, loaded on first use, or the given source."""
        return open_source(self.source, self.activation_args, self.training_args, self.state)

    @cached_property
    def attribution(self) -> Attribution:
        """The source's attribution split, scored with training-sized BatchTopK batches."""
        return Attribution(self.data, self.attribution_args, self.training_args.per_device_train_batch_size)

    # -- one cycle ----------------------------------------------------------------------------------------------
    def _new_model(self, t: int, core: DMSAECore | None, seed: int) -> DMSAEModel:
        """A fresh model of cycle `t` around `core` (rows copied unchanged), `k_noncore` fixed for the run."""
        sae = dataclasses.replace(self.sae_args, k_noncore=self.k_noncore)
        return new_model(sae, self.data, core, seed=seed, cycle=t)

    def _training_args(self, folder: Path, seed: int) -> DMSAETrainingArguments:
        return dataclasses.replace(self.training_args, output_dir=str(folder), seed=seed, push_to_hub=False)

    def held_out_metrics(self, model: DMSAEModel) -> dict[str, float]:
        """FVU, L0s and dead fraction on the held-out slice (main process; {} elsewhere)."""
        if self.training_args.process_index != 0 or self.data.eval_slice is None:
            return {}
        batches = self.data.eval_batches(self.training_args.per_device_eval_batch_size)
        return {f"eval_{k}": v for k, v in activation_metrics(model, batches).items()}

    def _save_core(self, core: DMSAECore, folder: Path, record: dict) -> None:
        if self.state.writer:
            core.save_pretrained(folder)
        record.update(core=str(folder.relative_to(self.output_dir)), core_digest=core.digest())

    def _cycle(self, t: int, previous: DMSAECore | None) -> DMSAECore:
        record = self.state.record("cycles", str(t))
        if record.get("core"):
            return load_recorded_core(self.output_dir, record)
        folder = self.output_dir / f"cycle{t}"
        with StageTimes() as times:
            if t == 0 and self.cycle0 is not None:
                model = load_cycle0(self.cycle0, k=self.args.cycle0_k).to(self.training_args.device)
                core = self.attribution.select(model.eval(), cycle=0, source_model=self.args.cycle0_checkpoint)
                metrics = self.held_out_metrics(model)
            else:
                seed = self.training_args.seed + t
                piece = self.data.training_slice(f"cycle{t}")
                callback = AttributionCallback(
                    self.attribution, previous.latent_ids if previous else None, cycle=t, source_model=str(folder)
                )
                model = self._new_model(t, previous, seed)
                trainer = train_sae(model, self.data, piece, self._training_args(folder, seed), callbacks=[callback])
                core = callback.core
                metrics = self.held_out_metrics(model)
                record.update(
                    log_history=trainer.state.log_history,
                    track=callback.track,
                    steps=trainer.state.global_step,
                    convergence=trainer.convergence,
                )
        record["stages"] = times.summary()
        carried = len(set(core.latent_ids) & set(previous.latent_ids)) if previous is not None else 0
        self._save_core(core, folder / "core", record)
        record.update(
            size=len(core),
            coverage=core.coverage,
            carried_over=carried,
            metrics=metrics,
            k_noncore=self.k_noncore if t or self.cycle0 is None else None,
        )
        self.state.save()
        logger.info(
            "Cycle %d: core of %d latents (%.3f coverage), %d carried over", t, len(core), core.coverage, carried
        )
        return core

    # -- the whole run ------------------------------------------------------------------------------------------
    def run(self) -> DMSAECore:
        with StageTimes() as times:
            _ = (
                self.attribution
            )  # the attribution split comes first in the stream: its pairs are harvested before cycle 0
        if "setup" not in self.state.data:  # what a resumed run finds cached is not the setup's cost
            self.state.data["setup"] = {"stages": times.summary()}
            self.state.save()
        cores: list[DMSAECore] = []
        for t in range(self.args.num_cycles + 1):
            cores.append(self._cycle(t, cores[-1] if cores else None))
            overlap = jaccard(set(cores[-1].latent_ids), set(cores[-2].latent_ids)) if t else 0.0
            if t and self.args.stop_cycles_at_overlap and overlap >= self.args.stop_cycles_at_overlap:
                logger.info("Cycle %d's core overlaps the one before by %.3f: distillation ends here", t, overlap)
                break
        last = len(cores) - 1
        distilled = cores[-1].intersect(cores[-2], distilled=True, cycle=last)
        record = self.state.record("distilled")
        self._save_core(distilled, self.output_dir / "distilled-core", record)
        record.update(size=len(distilled), last_cycle=last)
        self.state.save()
        if self.args.random_core_control:
            self._control(distilled, last)
        with StageTimes() as times, stage("publish"):
            self._publish(cores, distilled)
        self.state.data["publish"] = {"stages": times.summary()}
        self.state.save()
        return distilled

    @property
    def last_cycle(self) -> int:
        return self.state.data["distilled"]["last_cycle"]

    # -- the controls -------------------------------------------------------------------------------------------
    def control_cores(self, distilled: DMSAECore, last: int, seed: int) -> dict[str, DMSAECore]:
        """The three cores of a control seed, all of `|C*|` rows: the distilled core and `control_cores`'."""
        last_model = load_trained_model(self.output_dir / f"cycle{last}")
        return {"distilled": distilled, **control_cores(distilled, self.data.d_in, seed, last_model)}

    def _control(self, distilled: DMSAECore, last: int) -> None:
        piece = self.data.training_slice("control")
        results = self.state.record("control")
        for seed in self.args.control_seeds:
            for kind, core in self.control_cores(distilled, last, seed).items():
                name = f"{kind}-seed{seed}"
                if name in results:
                    continue
                model = self._new_model(last + 1, core, seed)
                trainer = train_sae(
                    model, self.data, piece, self._training_args(self.output_dir / "control" / name, seed)
                )
                curve = [(e["step"], e["l0_core"]) for e in trainer.state.log_history if "l0_core" in e]
                results[name] = {
                    "core": kind,
                    "seed": seed,
                    "metrics": self.held_out_metrics(model),
                    "l0_core_curve": curve,
                    "convergence": trainer.convergence,
                }
                self.state.save()

    def _publish(self, cores: list[DMSAECore], distilled: DMSAECore) -> None:
        """Write every repo folder under the current names and push them as one set (main process; only with
        `push_to_hub`)."""
        if not self.state.writer:
            return
        datasets = [self.data.dataset_name]
        repos = {f"cycle {t} core": core_repo_name(self.model_repo, t) for t in range(len(cores))}
        repos["distilled core"] = core_repo_name(self.model_repo, None)
        has_model = (self.output_dir / f"cycle{self.last_cycle}" / "model.safetensors").is_file()
        if has_model:
            repos[f"model of cycle {self.last_cycle}"] = self.model_repo

        def others(repo: str) -> dict[str, str]:
            return {label: name for label, name in repos.items() if name != repo}

        items = []
        for t, core in enumerate(cores):
            repo = core_repo_name(self.model_repo, t)
            items.append(
                (
                    write_core_repo(
                        core, repo_folder(self.output_dir, repo), repo, datasets=datasets, related=others(repo)
                    ),
                    repo,
                )
            )
        repo = core_repo_name(self.model_repo, None)
        items.append(
            (
                write_core_repo(
                    distilled,
                    repo_folder(self.output_dir, repo),
                    repo,
                    datasets=datasets,
                    cycles=cores,
                    tau=self.attribution_args.tau,
                    carry_over=carry_over(self.state.data),
                    related=others(repo),
                ),
                repo,
            )
        )
        if has_model:
            last = load_trained_model(self.output_dir / f"cycle{self.last_cycle}")
            record = self.state.record("cycles", str(self.last_cycle))
            items.append(
                (
                    write_model_repo(
                        last,
                        repo_folder(self.output_dir, self.model_repo),
                        self.model_repo,
                        datasets=datasets,
                        metrics=record.get("metrics", {}),
                        related=others(self.model_repo),
                        convergence=record.get("convergence"),
                        activations=self.activation_args,
                    ),
                    self.model_repo,
                )
            )
        publish_all(items, push=self.training_args.push_to_hub, token=self.training_args.hub_token)
