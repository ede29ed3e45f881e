"""The synthetic world of the ground-truth benchmark, whose useful features are known, its downstream task, and its
activation source.

The world is `sae_lens.synthetic`'s: activations `x = f W + b` of sparse feature activations `f` (Zipfian firing
probabilities, optionally a hierarchy and low-rank correlations) along known unit directions `W`. On top of it this
module defines a downstream task, so that "which features matter" has an answer: a random readout `R` ([classes,
features]) weights a known subset of features (`useful_fraction` of them) with scale `readout_scale` and the others
with `readout_off_weight` times that; a row's label is drawn from `softmax(R f)`. The downstream model only sees `x`:
it is the best linear readout of the label from `x` (a multinomial logistic probe `z(x) = A x + c`, fitted once per
world on rows of its own), and its loss `L = CE(z(x), label)` gives `g = ∂L/∂x = Aᵀ (softmax(z) − onehot(label))`:
the objective whose gradient × activation scores latents, as the LM's next-token loss does on text. Latents that
carry useful features score high; the others carry gradient only through the probe's small weights on them and the
directions' overlaps, so a selection can fail. (Reading the features back along their true directions instead does
worse than no input at all once the features are in superposition.)

`SyntheticSource` is a `run.data.ActivationSource`: each slice a run names is fresh rows, seeded by the seed and the
slice's name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..data.activations import norm_factor
from ..data.objective import ObjectiveBatch
from ..evaluation.consistency import abs_cosines
from ..evaluation.progressive import order_by
from ..method.attribution import AttributionArguments
from ..method.distillation import DistillationArguments
from ..model.core import DMSAECore
from ..model.modeling_dmsae import DMSAEModel
from ..run.trainer import DMSAETrainingArguments
from ..utils.checks import check_ranges
from ..utils.fields import fields_of


@dataclass
@fields_of(DistillationArguments, "num_cycles")
class SyntheticArguments:
    """The synthetic world, its downstream task, the rows each SAE trains and is measured on, when a latent is a true
    feature, and the distillation's cycles (the seeds and SAEs are `StudyArguments`; the SAEs, attribution and
    training take their own arguments)."""

    num_features: int = field(default=256, metadata={"help": "Ground-truth features."})
    hidden_dim: int = field(default=128, metadata={"help": "Dimension of the synthetic activations."})
    root_features: int = field(
        default=4, metadata={"help": "Roots of sae_lens's feature hierarchy (depth 2; 0: no hierarchy)."}
    )
    branching_factor: int = field(default=3, metadata={"help": "Children per parent in the hierarchy."})
    hierarchy_depth: int = field(default=2, metadata={"help": "Levels of the hierarchy, its roots included."})
    correlation_rank: int = field(default=16, metadata={"help": "Rank of the features' correlations (0: none)."})
    correlation_scale: float = field(default=0.1, metadata={"help": "Scale of the low-rank correlations."})
    max_firing_probability: float = field(
        default=0.2, metadata={"help": "Firing probability of the most frequent feature (Zipfian)."}
    )
    min_firing_probability: float = field(default=0.01, metadata={"help": "Firing probability of the rarest feature."})
    zipf_exponent: float = field(default=0.5, metadata={"help": "Exponent of the Zipfian firing probabilities."})
    world_seed: int = field(
        default=1234, metadata={"help": "Seed of the world and its task (the same for every seed)."}
    )
    useful_fraction: float = field(
        default=0.25, metadata={"help": "Share of the features the task's readout weights heavily."}
    )
    useful_by: Literal["random", "frequent", "rare"] = field(
        default="random",
        metadata={
            "help": "Which features are useful: drawn at random, the most frequently firing or the rarest (a task "
            "need not prefer frequent features)."
        },
    )
    readout_classes: int = field(default=16, metadata={"help": "Classes of the downstream task."})
    readout_scale: float = field(
        default=3.0, metadata={"help": "Readout scale of the useful features (logits per unit of feature)."}
    )
    readout_off_weight: float = field(
        default=0.1, metadata={"help": "Readout scale of the other features, relative to the useful ones'."}
    )
    train_rows: int = field(default=1_000_000, metadata={"help": "Fresh rows per trained SAE."})
    eval_rows: int = field(default=65_536, metadata={"help": "Held-out rows (metrics, latent statistics)."})
    match_cos: float = field(
        default=0.8, metadata={"help": "|cos| at which a latent's decoder direction matches a true feature."}
    )

    def __post_init__(self):
        check_ranges(
            self,
            num_features=">= 2",
            hidden_dim=">= 1",
            root_features=">= 0",
            branching_factor=">= 1",
            hierarchy_depth=">= 1",
            correlation_rank=">= 0",
            correlation_scale=">= 0",
            max_firing_probability="(0, 1]",
            min_firing_probability="(0, 1]",
            zipf_exponent=">= 0",
            readout_classes=">= 2",
            readout_scale="> 0",
            readout_off_weight=">= 0",
            train_rows=">= 1",
            eval_rows=">= 1",
            match_cos="(0, 1]",
        )
        if self.min_firing_probability > self.max_firing_probability:
            raise ValueError(
                f"min_firing_probability={self.min_firing_probability} is invalid: must not exceed "
                f"max_firing_probability={self.max_firing_probability}"
            )
        if not 0 < self.useful_fraction < 1:
            raise ValueError(f"useful_fraction={self.useful_fraction} is invalid: must lie in (0, 1)")
        DistillationArguments(num_cycles=self.num_cycles)  # the distillation's own check


SAMPLE_CHUNK = 1_000_000
"""Rows a training slice is drawn in at a time."""


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") % 2**62


class SyntheticWorld:
    """`sae_lens.synthetic.SyntheticModel` and the readout task on its true features (module docstring)."""

    def __init__(self, args: SyntheticArguments):
        from sae_lens.synthetic import (
            HierarchyConfig,
            LowRankCorrelationConfig,
            SyntheticModel,
            SyntheticModelConfig,
            ZipfianFiringProbabilityConfig,
        )

        self.args = args
        self.config = SyntheticModelConfig(
            num_features=args.num_features,
            hidden_dim=args.hidden_dim,
            seed=args.world_seed,
            firing_probability=ZipfianFiringProbabilityConfig(
                exponent=args.zipf_exponent, max_prob=args.max_firing_probability, min_prob=args.min_firing_probability
            ),
            hierarchy=HierarchyConfig(
                total_root_nodes=args.root_features,
                branching_factor=args.branching_factor,
                max_depth=args.hierarchy_depth,
                compensate_probabilities=True,
            )
            if args.root_features
            else None,
            correlation=LowRankCorrelationConfig(
                rank=args.correlation_rank, correlation_scale=args.correlation_scale, seed=args.world_seed
            )
            if args.correlation_rank
            else None,
        )
        with torch.random.fork_rng():
            self.model = SyntheticModel(self.config)
        self.directions = self.model.feature_dict.feature_vectors.detach().float()
        self.bias = self.model.feature_dict.bias.detach().float()
        generator = torch.Generator().manual_seed(_seed_of("readout", args.world_seed))
        count = round(args.useful_fraction * args.num_features)
        # Measured, not the generator's firing probabilities: under a hierarchy a child's is conditional on its parent.
        self.firing_frequencies = (self.sample(65_536, _seed_of("firing", args.world_seed))[1] > 0).float().mean(0)
        order = {
            "random": torch.randperm(args.num_features, generator=generator),
            "frequent": self.firing_frequencies.argsort(descending=True, stable=True),
            "rare": self.firing_frequencies.argsort(stable=True),
        }[args.useful_by]
        self.useful = order[:count].sort().values
        weight = torch.full((args.num_features,), args.readout_off_weight)
        weight[self.useful] = 1.0
        weight *= args.readout_scale
        self.readout = torch.randn(args.readout_classes, args.num_features, generator=generator) * weight
        self.norm_factor = norm_factor(self.sample(16_384, _seed_of("norm", args.world_seed))[0])
        self.probe = self._fit_probe(65_536)

    def _fit_probe(self, rows: int) -> torch.nn.Linear:
        """The downstream model: multinomial logistic regression of the label on `x`, fitted by L-BFGS."""
        x, f = self.sample(rows, _seed_of("probe", self.args.world_seed))
        labels = self.labels(f, _seed_of("probe labels", self.args.world_seed))
        with torch.random.fork_rng():
            torch.manual_seed(self.args.world_seed)
            probe = torch.nn.Linear(self.args.hidden_dim, self.args.readout_classes)
        optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(x), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
        return probe.requires_grad_(False)

    def digest(self) -> str:
        """What decides the world and its task (recorded by every run on it)."""
        task = {
            k: getattr(self.args, k)
            for k in ("useful_fraction", "useful_by", "readout_classes", "readout_scale", "readout_off_weight")
        }
        task["probe"] = hashlib.sha256(self.probe.weight.numpy().tobytes()).hexdigest()
        text = json.dumps({"world": self.config.to_dict(), "task": task}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` rows `x` and their true feature activations `f`, the same for the same seed."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            x, f = self.model.sample_with_features(n)
        return x.float(), f.float()

    def labels(self, features: torch.Tensor, seed: int) -> torch.Tensor:
        """One label per row, drawn from `softmax(R f)`."""
        generator = torch.Generator().manual_seed(seed)
        return torch.multinomial(torch.softmax(features @ self.readout.T, dim=1), 1, generator=generator).squeeze(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The downstream model's logits: the fitted linear probe on `x`."""
        return self.probe(x.float())

    def gradients(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`∂L/∂x` of each row's own task loss."""
        error = torch.softmax(self.logits(x), dim=1) - F.one_hot(labels, self.args.readout_classes).float()
        return error @ self.probe.weight

    def task_loss(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        return float(F.cross_entropy(self.logits(x), labels, reduction="sum"))


@dataclass
class RowSlice:
    """A named slice of fresh synthetic rows."""

    name: str
    rows: int


class Rows(torch.utils.data.Dataset):
    """In-memory activation rows with the interface of the activation caches (`__getitems__`, `sample`)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices) -> torch.Tensor:
        return self.rows[torch.as_tensor(indices, dtype=torch.long)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"activations": self.rows[index]}

    def sample(self, n: int) -> torch.Tensor:
        return self.rows[:n]


def attribution_rows(world: SyntheticWorld, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attribution split of a seed: rows no training run reads, and their labels."""
    x, f = world.sample(rows, _seed_of(seed, "attribution"))
    return x, world.labels(f, _seed_of(seed, "labels"))


class TaskGradients:
    """The attribution's `(x, g)` pairs: held-out rows, their labels and the task's gradient (`GradientPairs`)."""

    def __init__(self, world: SyntheticWorld, rows: int, seed: int):
        x, labels = attribution_rows(world, rows, seed)
        self._pairs = {"activations": x, "gradients": world.gradients(x, labels)}
        self.max_rows = rows

    def pairs(self):
        return [self._pairs]


class TaskObjective:
    """The task's loss on the first `scored` rows of the attribution split (of `rows`), each a sequence of one
    position, `batch_rows` rows a batch (`data.objective.Objective`, for the ablation and integrated-gradients
    scorers)."""

    def __init__(self, world: SyntheticWorld, rows: int, seed: int, batch_rows: int, scored: int):
        x, labels = attribution_rows(world, rows, seed)
        x, labels = x[:scored], labels[:scored]
        self.world, self.max_rows = world, len(x)
        self._batches = [
            ObjectiveBatch(part[:, None], torch.ones(len(part), 1, dtype=torch.bool), part_labels)
            for part, part_labels in zip(x.split(batch_rows), labels.split(batch_rows), strict=True)
        ]

    def batches(self) -> list[ObjectiveBatch]:
        return self._batches

    def losses(self, batch: ObjectiveBatch, activations: torch.Tensor) -> torch.Tensor:
        logits = self.world.logits(activations[:, 0])
        return F.cross_entropy(logits, batch.context.to(logits.device), reduction="none")[:, None]

    def gradients(self, batch: ObjectiveBatch, activations: torch.Tensor) -> torch.Tensor:
        return self.world.gradients(activations[:, 0], batch.context.to(activations.device))[:, None]


class SyntheticSource:
    """The world's activations for one seed's runs (`runs.ActivationSource`); the task is its objective."""

    dataset_name = "sae_lens.synthetic"
    default_repo = "dmsae-synthetic"

    def __init__(self, world: SyntheticWorld, train_rows: int, eval_rows: int, seed: int):
        self.world, self.train_rows, self.seed = world, train_rows, seed
        self.d_in = world.args.hidden_dim
        self.eval_slice = RowSlice("eval", eval_rows) if eval_rows else None
        self._eval, self._last_slice = None, (None, None)

    def input_identity(self) -> dict:
        return {"inputs.synthetic_world": self.world.digest(), "inputs.synthetic_seed": self.seed}

    def sae_fields(self) -> dict:
        return {"d_in": self.d_in, "norm_factor": self.world.norm_factor}

    def training_slice(self, name: str) -> RowSlice:
        return RowSlice(name, self.train_rows)

    def training_data(self, piece: RowSlice, args: DMSAETrainingArguments) -> Rows:
        """The slice's rows, drawn in chunks of `SAMPLE_CHUNK` rows (the true features of a whole large slice would
        not fit in memory); the first chunk's seed is the slice's own, so a slice of one chunk is one draw. The last
        slice drawn is kept: a transfer trains every model on the same slice, and drawing it costs more than training
        on it."""
        if self._last_slice[0] == (piece.name, piece.rows):
            return Rows(self._last_slice[1])
        chunks = range(0, piece.rows, SAMPLE_CHUNK)
        rows = torch.cat(
            [
                self.world.sample(
                    min(SAMPLE_CHUNK, piece.rows - start),
                    _seed_of(self.seed, piece.name, *([start] if start else [])),
                )[0]
                for start in chunks
            ]
        )
        self._last_slice = ((piece.name, piece.rows), rows)
        return Rows(rows)

    def finish_slice(self, piece: RowSlice, dataset) -> RowSlice:
        return piece

    def eval_dataset(self) -> None:
        return None

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out rows and their labels."""
        if self._eval is None:
            x, f = self.world.sample(self.eval_slice.rows, _seed_of(self.seed, "eval"))
            self._eval = x, self.world.labels(f, _seed_of(self.seed, "eval labels"))
        return self._eval

    def eval_batches(self, batch_size: int):
        if self.eval_slice is not None:
            yield from self.held_out()[0].split(batch_size)

    def gradient_pairs(self, args: AttributionArguments) -> TaskGradients:
        return TaskGradients(self.world, args.attribution_tokens, self.seed)

    def objective(self, args: AttributionArguments, batch_size: int) -> TaskObjective:
        """The attribution split's first `scorer_tokens` rows (all with 0), `batch_size` rows a batch."""
        rows = args.attribution_tokens
        return TaskObjective(self.world, rows, self.seed, batch_size, min(args.scorer_tokens or rows, rows))

    @torch.no_grad()
    def downstream_metrics(self, model: DMSAEModel, batches: int) -> dict[str, float]:
        """Task loss clean, with the reconstruction, and with `x` ablated to the bias (no feature); the share
        recovered; and the decoder's MCC against all true features."""
        from sae_lens.synthetic import mean_correlation_coefficient

        was_training = model.training
        model.eval()
        x, labels = self.held_out()
        reconstruction = torch.cat(
            [model.decode(model.encode(rows.to(model.device))).float().cpu() for rows in x.split(4096)]
        )
        model.train(was_training)
        losses = {
            "task_loss_clean": self.world.task_loss(x, labels),
            "task_loss_sae": self.world.task_loss(reconstruction, labels),
            "task_loss_ablated": self.world.task_loss(self.world.bias.expand_as(x), labels),
        }
        losses = {k: v / len(x) for k, v in losses.items()}
        recovered = (losses["task_loss_ablated"] - losses["task_loss_sae"]) / (
            losses["task_loss_ablated"] - losses["task_loss_clean"]
        )
        mcc = mean_correlation_coefficient(model.W_dec.detach().float().cpu(), self.world.directions)
        return {**losses, "task_loss_recovered": recovered, "mcc": mcc}


def matches(directions: torch.Tensor, truth: torch.Tensor, match_cos: float) -> torch.Tensor:
    """Whether each direction matches one of `truth` (|cos| ≥ `match_cos`)."""
    return abs_cosines(directions, truth).max(1).values >= match_cos


def match_truth(directions: torch.Tensor, truth: torch.Tensor, match_cos: float) -> dict[str, float]:
    """Precision (share of `directions` matching a true direction), recall (share of `truth` matched) and MCC."""
    from sae_lens.synthetic import mean_correlation_coefficient

    cos = abs_cosines(directions, truth)
    return {
        "size": len(directions),
        "precision": float((cos.max(1).values >= match_cos).float().mean()),
        "recall": float((cos.max(0).values >= match_cos).float().mean()),
        "mcc": mean_correlation_coefficient(F.normalize(directions, dim=1), F.normalize(truth, dim=1)),
    }


def pool_rankings(
    model: DMSAEModel, core: DMSAECore, stats: dict[str, torch.Tensor], seed: int
) -> dict[str, list[int]]:
    """The candidate pool's latents (indices) ranked by each selection method: by attribution score (the order the
    core was selected in), at random, by activation frequency and by mean squared activation."""
    pool = model.config.candidate_pool_size
    ids = model.config.latent_ids()
    generator = torch.Generator().manual_seed(seed)
    return {
        "attribution": [ids.index(i) for i in core.pool_ids],
        "random": torch.randperm(pool, generator=generator).tolist(),
        "frequency": order_by(stats["frequency"][:pool]).tolist(),
        "mean_squared": order_by(stats["mean_squared"][:pool]).tolist(),
    }


def r_precision(ranking: list[int], useful: torch.Tensor) -> float | None:
    """Share of useful latents among the first m of `ranking`, m the number of useful latents it holds (precision =
    recall at that cut): how well the ranking alone separates them, whatever size τ gives the core."""
    m = int(useful[ranking].sum())
    return float(useful[ranking[:m]].float().mean()) if m else None


def world_summary(world: SyntheticWorld) -> dict:
    """What a report says of the world: its true L0 (on 65 536 sampled rows) and how many features are useful."""
    true_l0 = float((world.sample(65_536, _seed_of("true l0"))[1] > 0).float().sum(1).mean())
    return {"true_l0": true_l0, "useful": len(world.useful)}
