"""The core's dynamics (the paper's Fig. 3, studied): `E[L0_core]` over training for a distilled core, a random-init
core of the same size and no core, at several token budgets and seeds, on an LM's activations or in the synthetic
world; and, one at a time, an ablation for each hypothesis of what drives a dense core towards always-on.

Every run is an ordinary resumable `train_sae` run around a core from a finished distillation (its distilled core;
the random cores drawn as its control draws them, per seed). An LM study reads one training slice of `max(budgets)`
rows from the start of the training split, harvested once into the activation cache: each run reads `budget` rows of
it, drawn in its seed's order, none twice (streamed, every run would harvest its tokens again, and runs of different
budgets would end the one slice at different places). A synthetic study
reads fresh rows per seed and budget. Every budget is a full run
with its own learning-rate schedule. Beside the curves each run records the core's geometry before and after training
(`core_geometry`): how often its latents fire, their mean pre-activation in units of its spread, their alignment with
the activations' mean direction and the variance of the activations along them.

Layout: `<study_dir>/seed{s}/state.json` (identity, slices, each run's record), `<study_dir>/seed{s}/<ablation>/
<core>-b<budget>/` (the Trainer's output), and `results.json` in `<study_dir>`, from which
`reporting.core_dynamics.core_dynamics_report` writes `report.md` and `figures/`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.activations import ActivationArguments
from ..evaluation.core_usage import core_usage
from ..evaluation.held_out import activation_metrics
from ..method.distillation import control_cores, random_core, random_core_generator
from ..model.core import DMSAECore
from ..model.modeling_dmsae import DMSAEModel
from ..run.arguments import SAEArguments, k_noncore_for, new_model
from ..run.data import open_source
from ..run.results import CORE_DYNAMICS_RESULTS, StudyResults
from ..run.state import RunState, arguments_identity, distilled_core_record, load_recorded_core
from ..run.trainer import DMSAETrainingArguments
from ..run.training import load_trained_model, train_sae, training_steps
from ..utils.checks import check_ranges
from .arguments import StudyArguments, StudySourceArguments
from .synthetic_world import SyntheticArguments, SyntheticSource, SyntheticWorld

logger = logging.getLogger(__name__)

CORE_KINDS = ("distilled", "random_init", "random_trained", "random_off_top", "none")
CURVE_POINTS = 50
"""Training-log entries of each run (its logging interval: steps / 50)."""


@dataclass(frozen=True)
class Ablation:
    """One hypothesis and the change that tests it."""

    name: str
    hypothesis: str
    overrides: dict = field(default_factory=dict)
    """Fields of `SAEArguments` or `DMSAETrainingArguments` and their ablated values."""
    random_core: str = "random_init"
    """The random core it trains: `random_init` (isotropic unit rows) or `random_off_top` (the activations' top
    principal components projected out)."""


ABLATIONS = {
    a.name: a
    for a in (
        Ablation(
            "paper",
            "The method as specified: Eq. 5's sum of prefix losses, unit-norm decoder, trained biases, "
            "learning-rate decay over the last 20% of steps, no gradient clipping.",
        ),
        Ablation(
            "loss_over_groups_squared",
            "The prefix weighting: dictionary_learning's Σ/G² (AuxK weighs G² times "
            "more under Adam) instead of Eq. 5's Σ.",
            {"prefix_loss_weighting": "dictionary_learning"},
        ),
        Ablation("gradient_clipping", "Large unclipped gradient steps push the core on.", {"max_grad_norm": 1.0}),
        Ablation("no_lr_decay", "The climb comes with the learning rate's decay phase.", {"decay_fraction": 0.0}),
        Ablation(
            "core_bias_frozen",
            "The core latents' encoder biases rise (held at their initial 0 here).",
            {"train_core_bias": False},
        ),
        Ablation(
            "decoder_bias_frozen",
            "The decoder bias moves so that core pre-activations rise (held at its "
            "geometric-median initialisation here).",
            {"train_decoder_bias": False},
        ),
        Ablation(
            "biases_frozen",
            "Both biases together turn the core on (both held at their initialisation).",
            {"train_core_bias": False, "train_decoder_bias": False},
        ),
        Ablation(
            "free_decoder_norm",
            "The unit-norm decoder constraint makes core latents carry their magnitude in "
            "their activations (decoder rows free here).",
            {"unit_norm_decoder": False},
        ),
        Ablation(
            "random_core_off_top",
            "The activations' anisotropy: random directions read the top principal "
            "components (the random core's rows drawn orthogonal to them here).",
            random_core="random_off_top",
        ),
    )
}


@dataclass
class CoreDynamicsArguments:
    """The study: the activations, the distillation whose core it trains, the cores, budgets, seeds and ablations."""

    distillation_dir: str | None = field(
        default=None,
        metadata={
            "help": "The finished distillation whose distilled core is studied; `{seed}` becomes the seed "
            "(default: output_dir for lm, output_dir/seed{seed}/distillation for synthetic)."
        },
    )
    study_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the study's runs (default: output_dir/core-dynamics)."},
    )
    budgets: list[int] = field(
        default_factory=lambda: [200_000, 500_000, 1_000_000],
        metadata={"help": "Training tokens (rows) of each run, each a full run with its own schedule."},
    )
    cores: list[str] = field(
        default_factory=lambda: ["distilled", "random_init", "none"],
        metadata={"help": f"Cores trained at every budget and seed, of {CORE_KINDS}."},
    )
    ablations: list[str] = field(
        default_factory=lambda: [a for a in ABLATIONS if a != "paper"],
        metadata={"help": f"Ablations run at ablation_budget, of {tuple(ABLATIONS)}."},
    )
    ablation_budget: int | None = field(
        default=None, metadata={"help": "Budget of the ablation runs (default: the middle budget)."}
    )
    ablation_seeds: list[int] | None = field(
        default=None, metadata={"help": "Seeds of the ablation runs (default: seeds)."}
    )
    top_components: int = field(
        default=16, metadata={"help": "Principal components the random_off_top core's rows are orthogonal to."}
    )
    geometry_rows: int = field(default=16_384, metadata={"help": "Held-out rows the cores' geometry is measured on."})
    usage_rows: int = field(
        default=4096, metadata={"help": "Held-out rows the core's usage is measured on at every training log."}
    )

    def __post_init__(self):
        check_ranges(self, ablation_budget=">= 1", top_components=">= 0", geometry_rows=">= 1", usage_rows=">= 1")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"budgets={self.budgets} is invalid: give at least one positive budget")
        if unknown := set(self.cores) - set(CORE_KINDS):
            raise ValueError(f"cores={self.cores} is invalid: {sorted(unknown)} not of {CORE_KINDS}")
        if unknown := set(self.ablations) - set(ABLATIONS):
            raise ValueError(f"ablations={self.ablations} is invalid: {sorted(unknown)} not of {tuple(ABLATIONS)}")
        if self.ablation_budget is None:
            self.ablation_budget = sorted(self.budgets)[len(self.budgets) // 2]


@dataclass(frozen=True)
class PlannedRun:
    """One run of the study: a core kind trained at a token budget under an ablation's settings."""

    ablation: Ablation
    core: str
    budget: int

    @property
    def name(self) -> str:
        return f"{self.ablation.name}/{self.core}-b{self.budget}"


class CoreDynamics:
    """The whole study; `run()` does what is left and writes the results and the report."""

    def __init__(
        self,
        args: CoreDynamicsArguments,
        source: StudySourceArguments,
        study: StudyArguments,
        sae: SAEArguments,
        activations: ActivationArguments | None,
        synthetic: SyntheticArguments | None,
        training: DMSAETrainingArguments,
    ):
        self.source, self.seeds = source.study_source, study.seeds
        if self.source == "lm" and activations is None:
            raise ValueError("an lm study needs activation arguments (the LM and the text)")
        if self.source == "lm" and activations.activation_cache is None:
            raise ValueError(
                "an lm study reads one slice of max(budgets) rows in every run: give --activation_cache "
                "(the slice is harvested from the stream once, into it)"
            )
        training_steps(min(args.budgets), training)  # every budget holds the steps asked for
        self.args, self.sae_args, self.synthetic_args, self.training_args = args, sae, synthetic, training
        self.activation_args = None
        if self.source == "lm":
            self.activation_args = dataclasses.replace(activations, num_tokens=max(args.budgets))
        self.k_noncore = k_noncore_for(sae, reference_core_size=0)  # as the distillation trains
        self.ablation_seeds = self.seeds if args.ablation_seeds is None else args.ablation_seeds
        self.study_dir = Path(args.study_dir or Path(training.output_dir) / "core-dynamics")
        self.results_dir = Path(study.results_dir or self.study_dir)
        self.world = SyntheticWorld(synthetic) if self.source == "synthetic" else None

    # -- what the study trains ----------------------------------------------------------------------------------
    def plan(self, seed: int) -> list[PlannedRun]:
        """The paper's settings for every core and budget, then each ablation at its budget (its seeds only); a run
        planned twice (the `paper` ablation's random core at a study budget) runs once."""
        paper = ABLATIONS["paper"]
        runs = [PlannedRun(paper, core, budget) for budget in sorted(self.args.budgets) for core in self.args.cores]
        if seed in self.ablation_seeds:
            for name in self.args.ablations:
                ablation = ABLATIONS[name]
                for core in ("distilled", ablation.random_core):
                    if ablation.overrides or core != "distilled":
                        runs.append(PlannedRun(ablation, core, self.args.ablation_budget))
        return list({run.name: run for run in runs}.values())

    def distillation_dir(self, seed: int) -> Path:
        default = "{output_dir}" if self.source == "lm" else "{output_dir}/seed{seed}/distillation"
        pattern = self.args.distillation_dir or default
        return Path(pattern.format(seed=seed, output_dir=self.training_args.output_dir))

    def distilled_core(self, seed: int) -> DMSAECore:
        folder = self.distillation_dir(seed)
        return load_recorded_core(folder, distilled_core_record(folder))

    def identity(self, seed: int) -> dict:
        given = [a for a in (self.sae_args, self.activation_args, self.synthetic_args, self.training_args) if a]
        identity = arguments_identity(*given, exclude=("DMSAETrainingArguments.seed",))
        identity |= {
            "study.source": self.source,
            "study.seed": seed,
            "study.top_components": self.args.top_components,
            "study.geometry_rows": self.args.geometry_rows,
        }
        return identity

    def _training(self, folder: Path, seed: int, budget: int, overrides: dict) -> DMSAETrainingArguments:
        a = self.training_args
        steps = budget // (a.per_device_train_batch_size * a.world_size * a.gradient_accumulation_steps)
        if steps < 1:
            raise ValueError(f"budget {budget} is less than one optimiser step's rows")
        return dataclasses.replace(
            a,
            output_dir=str(folder),
            seed=seed,
            max_steps=steps,
            push_to_hub=False,
            logging_steps=max(1, steps // CURVE_POINTS),
            **{k: v for k, v in overrides.items() if hasattr(a, k)},
        )

    # -- one seed -----------------------------------------------------------------------------------------------
    def run_seed(self, seed: int) -> list[dict]:
        folder = self.study_dir / f"seed{seed}"
        state = RunState(folder, "core_dynamics", self.identity(seed), writer=self.training_args.process_index == 0)
        distilled = self.distilled_core(seed)
        state.require({"inputs.distilled_core": distilled.digest()})
        sources, held_out = {}, None
        for planned in self.plan(seed):
            records = state.record("runs")
            if planned.name in records:
                continue
            key = planned.budget if self.world is not None else None
            if key not in sources:
                sources[key] = self._data(state, seed, planned.budget)
            data, piece = sources[key]
            if held_out is None:
                held_out = torch.cat(list(_first_rows(data.eval_batches(4096), self.args.geometry_rows)))
                cores = self.cores(distilled, seed, held_out / data.sae_fields()["norm_factor"])
            a = planned.ablation
            overrides = {k: v for k, v in a.overrides.items() if hasattr(self.sae_args, k)}
            sae = dataclasses.replace(self.sae_args, k_noncore=self.k_noncore, **overrides)
            core = cores[planned.core]
            model = new_model(sae, data, core, seed=seed)
            # The geometry at the start, with b_dec at the geometric median (of held-out rows here; training starts
            # it on its first rows).
            model.init_decoder_bias(held_out[: self.training_args.init_decoder_bias_rows])
            start = core_geometry(model, held_out)
            args = self._training(folder / planned.name, seed, planned.budget, a.overrides)
            logger.info("Seed %d: %s (%d steps)", seed, planned.name, args.max_steps)
            usage_rows = held_out[: self.args.usage_rows] if core is not None else None
            trainer = train_sae(model, data, piece, args, core_usage_rows=usage_rows)
            history = trainer.state.log_history
            records[planned.name] = {
                "ablation": a.name,
                "core": planned.core,
                "budget": planned.budget,
                "seed": seed,
                "core_size": len(core) if core is not None else 0,
                "steps": trainer.state.global_step,
                "convergence": trainer.convergence,
                "l0_core_curve": [(e["step"], e["l0_core"]) for e in history if "l0_core" in e and core is not None],
                "fvu_curve": [(e["step"], e["fvu"]) for e in history if "fvu" in e],
                "learning_rate_curve": [(e["step"], e["learning_rate"]) for e in history if "learning_rate" in e],
                "metrics": {f"eval_{k}": v for k, v in activation_metrics(model, data.eval_batches(4096)).items()},
                "geometry": {"start": start, "end": core_geometry(model, held_out)},
                "core_usage_curve": core_usage_curve(history),
                "core_usage": core_usage(model, held_out),
            }
            state.save()
            del trainer, model  # a synthetic slice's rows: gone before the next run draws its own
        state.close()
        return list(state.data["runs"].values())

    def _data(self, state: RunState, seed: int, budget: int):
        """The activations and the training slice of a run: for an LM the one slice every run reads from, for the
        synthetic world fresh rows of this seed and budget."""
        if self.world is None:
            data = open_source(None, self.activation_args, self.training_args, state)
            return data, data.training_slice("core-dynamics")
        source = SyntheticSource(self.world, budget, self.synthetic_args.eval_rows, seed)
        data = open_source(source, None, self.training_args, state)
        return data, data.training_slice(f"core-dynamics-b{budget}")

    def cores(self, distilled: DMSAECore, seed: int, x: torch.Tensor) -> dict[str, DMSAECore | None]:
        """The seed's cores, all of `|C*|` rows: the distilled core, the control's random unit rows and, if asked,
        its trained latents of the last cycle outside the core (the same rows as the distillation's control of this
        seed, `control_cores`), random unit rows orthogonal to the top principal components of `x` (normalised
        held-out activations), and none."""
        top = principal_directions(x, self.args.top_components)
        last = None
        if "random_trained" in self.args.cores:
            folder = self.distillation_dir(seed)
            last = load_trained_model(folder / f"cycle{distilled_core_record(folder)['last_cycle']}")
        return {
            "distilled": distilled,
            **control_cores(distilled, x.shape[1], seed, last),
            "random_off_top": random_core(distilled, x.shape[1], random_core_generator(seed), remove=top),
            "none": None,
        }

    # -- the whole study ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every seed's runs (each resumes from its seed's state), then `results.json` written whole from them, under
        its lock all along: a second study on the same folder is refused rather than leaving only its own seeds."""
        with StudyResults(self.results_dir / "results.json", None, CORE_DYNAMICS_RESULTS) as store:
            store.data = self._results()
            store.save()
            return store.data

    def _results(self) -> dict:
        runs = [r for seed in self.seeds for r in self.run_seed(seed)]
        return {
            "source": self.source,
            "sparsity": self.sae_args.sparsity,
            "budgets": sorted(self.args.budgets),
            "ablation_budget": self.args.ablation_budget,
            "runs": runs,
            "ablations": {
                name: {"hypothesis": a.hypothesis, "overrides": a.overrides, "random_core": a.random_core}
                for name, a in ABLATIONS.items()
            },
        }


def core_usage_curve(history: list[dict]) -> list[dict]:
    """The `core_usage_*` values of a training log, one entry per logged step."""
    prefix = "core_usage_"
    return [
        {"step": e["step"], **{k[len(prefix) :]: v for k, v in e.items() if k.startswith(prefix)}}
        for e in history
        if any(k.startswith(prefix) for k in e)
    ]


def _first_rows(batches, rows: int):
    """Batches until `rows` rows are given (the last one cut)."""
    for batch in batches:
        if rows <= 0:
            return
        yield batch[:rows]
        rows -= len(batch)


def principal_directions(x: torch.Tensor, count: int) -> torch.Tensor:
    """`[count, d]` orthonormal top principal directions of the rows of `x`."""
    centred = x.double() - x.double().mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    return vectors[:, -count:].T.float().contiguous() if count else x.new_zeros(0, x.shape[1])


@torch.no_grad()
def core_geometry(model: DMSAEModel, activations: torch.Tensor) -> dict[str, float]:
    """The core latents on raw held-out `activations` (means over the core): `firing` the share of rows where a
    latent is on (dense core: ReLU only); `mean_preactivation_in_std` its mean pre-activation over the spread of its
    pre-activation (high: on for almost every row); `b_enc` its encoder bias; `mean_direction_cos` |cos| of its
    encoder row with the activations' mean; `variance_ratio` the activations' variance along the row over the mean
    variance per direction (1: an isotropic direction; ≫ 1: a top principal component). Empty without a core."""
    c = model.config.core_size
    if c == 0:
        return {}
    x = activations.to(model.W_dec.device, model.W_dec.dtype) / model.config.norm_factor
    rows = model.W_enc_frozen if model.config.frozen_rows == c else model.W_enc[:c]
    unit = rows / rows.norm(dim=1, keepdim=True)
    pre = (x - model.b_dec) @ rows.T + model.b_enc[:c]
    mean = x.mean(0)
    per_direction = (x - mean).pow(2).sum(1).mean() / x.shape[1]
    values = {
        "firing": (pre > 0).float().mean(),
        "mean_preactivation_in_std": (pre.mean(0) / pre.std(0).clamp_min(1e-12)).mean(),
        "b_enc": model.b_enc[:c].mean(),
        "mean_direction_cos": (unit @ (mean / mean.norm())).abs().mean(),
        "variance_ratio": (((x - mean) @ unit.T).pow(2).mean(0) / per_direction).mean(),
    }
    return {k: round(float(v), 6) for k, v in values.items()}
