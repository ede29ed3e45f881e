"""Attribution-guided core selection (docs/method.md §3, Eq. 6 and 7).

For each position `u` of the run's attribution split (text no training run reads), `x_u` is the activation at the
hook of a clean LM forward pass and `g_u = ∂L/∂x_u` the gradient of the LM's next-token loss there. Neither depends
on the SAE, so the pairs are harvested once per run (`runs.LMGradientPairs`) and every cycle, control and
tracking step reuses them: scoring an SAE then costs one encode per position.

`a_{u,j}` is latent j's activation under the training masks: BatchTopK over batches of the *training* batch size,
drawn from the shuffled pairs (a short last batch is completed with the first pairs, which are not counted twice),
so the masks depend neither on the LM's batching nor on how many sequences one attribution pass holds. With `ŵ_j`
latent j's unit decoder direction, `GxA_{u,j} = |a_{u,j} · (g_u · ŵ_j)|`. A latent's score is the exact q-quantile
of its GxA over all positions, zeros included, kept in one streaming pass that holds only the top `⌈(1−q)·N⌉+1`
values per latent. The core is the smallest set of latents, by descending score, whose summed score reaches `τ` of
the candidate pool's total.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..model.core import DMSAECore
from ..model.modeling_dmsae import DMSAEModel
from ..run.trainer import whole_model
from ..utils.checks import check_ranges
from ..utils.stages import stage
from .scorers import (
    Objective,
    Scorer,
    ablation_values,
    gxa_values,
    integrated_gradient_values,
)

logger = logging.getLogger(__name__)


class StreamingQuantile:
    """Exact `q`-quantile (linear interpolation, as `torch.quantile`) of each column of a stream of rows, holding
    only the `⌈(1−q)·max_rows⌉+1` largest values per column."""

    def __init__(self, num_columns: int, q: float, max_rows: int):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q={q} is invalid: must lie in [0, 1]")
        self.q, self.max_rows, self.count = q, max_rows, 0
        self.keep = min(max_rows, math.ceil((1.0 - q) * max_rows) + 1)
        self.top = torch.empty(num_columns, 0)

    def update(self, rows: torch.Tensor) -> None:
        """Add `[n, num_columns]` values."""
        if self.count + len(rows) > self.max_rows:
            raise ValueError(f"more than max_rows={self.max_rows} rows given")
        self.merge(rows.T, len(rows))

    def merge(self, tops: torch.Tensor, count: int) -> None:
        """Fold in `[num_columns, m]` values standing for `count` rows: new rows (transposed), or another stream's
        kept values and count (e.g. from another process)."""
        merged = torch.cat([self.top.to(tops.device, tops.dtype), tops], dim=1)
        self.top = merged.topk(min(self.keep, merged.shape[1]), dim=1).values
        self.count += count

    def gather(self, device: torch.device) -> None:
        """Merge the kept values and counts of every process (a no-op outside `torch.distributed`); afterwards
        each process holds the state of all rows seen anywhere. `device` is where the backend communicates."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        padded = torch.full((self.top.shape[0], self.keep), -torch.inf, device=device)
        padded[:, : self.top.shape[1]] = self.top
        gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, padded)
        count = torch.tensor(self.count, device=device)
        dist.all_reduce(count)
        merged = torch.cat(gathered, dim=1)
        self.count = int(count)
        self.top = merged.topk(min(self.keep, self.count), dim=1).values.cpu()

    def compute(self) -> torch.Tensor:
        """The per-column quantile over all rows seen."""
        if self.count == 0:
            raise ValueError("no rows were given")
        # The interpolation position in the values' dtype, as torch.quantile computes it.
        position = torch.tensor(self.q, dtype=self.top.dtype) * (self.count - 1)
        lower, upper = int(position.floor()), int(position.ceil())
        # Ascending index i of the full column is descending rank count-1-i among the kept values.
        low, high = self.top[:, self.count - 1 - lower], self.top[:, self.count - 1 - upper]
        return torch.lerp(low, high, (position - lower).expand_as(low))


def training_sized_batches(
    blocks: Iterable[dict[str, torch.Tensor]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """`(activations, gradients, new)` batches of exactly `batch_size` pairs, in the order of `blocks`; the last
    batch is completed with the first pairs, of which only the `new` first rows are new."""
    head: list[dict[str, torch.Tensor]] = []
    head_rows, pending = 0, None
    for block in blocks:
        if head_rows < batch_size:
            head.append({k: v[: batch_size - head_rows] for k, v in block.items()})
            head_rows += len(head[-1]["activations"])
        pending = block if pending is None else {k: torch.cat([pending[k], block[k]]) for k in block}
        while len(pending["activations"]) >= batch_size:
            yield pending["activations"][:batch_size], pending["gradients"][:batch_size], batch_size
            pending = {k: v[batch_size:] for k, v in pending.items()}
    new = len(pending["activations"]) if pending is not None else 0
    if new:
        first = {k: torch.cat([part[k] for part in head]) for k in pending}
        repeats = math.ceil((batch_size - new) / len(first["activations"]))
        yield tuple(
            torch.cat([pending[k], first[k].repeat(repeats, 1)])[:batch_size] for k in ("activations", "gradients")
        ) + (new,)


class StreamingMean:
    """Mean of each column of a stream of rows (`StreamingQuantile`'s interface)."""

    def __init__(self, num_columns: int):
        self.total, self.count = torch.zeros(num_columns, dtype=torch.float64), 0

    def update(self, rows: torch.Tensor) -> None:
        self.total += rows.double().sum(0).cpu()
        self.count += len(rows)

    def gather(self, device: torch.device) -> None:
        """Sum the totals and counts of every process (a no-op outside `torch.distributed`)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        both = torch.cat([self.total, torch.tensor([float(self.count)], dtype=torch.float64)]).to(device)
        dist.all_reduce(both)
        self.total, self.count = both[:-1].cpu(), int(both[-1])

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no rows were given")
        return (self.total / self.count).float()


Aggregation = Literal["quantile", "mean"]


def aggregator(aggregation: Aggregation, num_columns: int, q: float, max_rows: int):
    """How a latent's values over positions become its score: their q-quantile (the paper's) or their mean."""
    if aggregation == "quantile":
        return StreamingQuantile(num_columns, q, max_rows)
    if aggregation == "mean":
        return StreamingMean(num_columns)
    raise ValueError(f"aggregation={aggregation!r} is invalid: quantile or mean")


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


@torch.no_grad()
def gxa_scores(
    sae: DMSAEModel,
    pairs: Iterable[dict[str, torch.Tensor]],
    *,
    batch_size: int,
    q: float,
    max_rows: int,
    aggregation: Aggregation = "quantile",
    progress: bool = True,
) -> torch.Tensor:
    """Score each candidate latent (core ∪ prefix-0) by the q-quantile (or mean) of its GxA over all pairs (at most
    `max_rows`). Under `torch.distributed`, process r of W scores batches r, r+W, …; the kept values are merged, so
    every process returns the scores of all positions."""
    pool = sae.config.candidate_pool_size
    rank, world = _rank_and_world()
    scores = aggregator(aggregation, pool, q, max_rows)
    bar = tqdm(
        total=max_rows, desc="attribution", unit="tok", unit_scale=True, disable=rank != 0 or not progress, leave=False
    )
    for index, (acts, grads, new) in enumerate(training_sized_batches(pairs, batch_size)):
        bar.update(new)
        if index % world == rank:
            scores.update(gxa_values(sae, acts, grads, pool)[:new].cpu())
    bar.close()
    scores.gather(sae.W_dec.device)
    return scores.compute()


@torch.no_grad()
def objective_scores(
    sae: DMSAEModel,
    objective: Objective,
    scorer: Scorer,
    *,
    q: float,
    aggregation: Aggregation = "quantile",
    ig_steps: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Score each candidate latent by the q-quantile (or mean) over the objective's scored positions of its
    `ablation` or `integrated_gradients` values (`scorers`); batches are shared among processes as `gxa_scores`'."""
    pool = sae.config.candidate_pool_size
    rank, world = _rank_and_world()
    scores = aggregator(aggregation, pool, q, objective.max_rows)
    bar = tqdm(total=objective.max_rows, desc=scorer, unit="tok", disable=rank != 0 or not progress, leave=False)
    for index, batch in enumerate(objective.batches()):
        bar.update(int(batch.keep.sum()))
        if index % world != rank:
            continue
        if scorer == "ablation":
            values = ablation_values(sae, objective, batch, pool)
        elif scorer == "integrated_gradients":
            values = integrated_gradient_values(sae, objective, batch, pool, ig_steps)
        else:
            raise ValueError(f"scorer={scorer!r} is not scored on an objective (gxa reads the gradient pairs)")
        scores.update(values.cpu())
    bar.close()
    scores.gather(sae.W_dec.device)
    return scores.compute()


@dataclass
class CoreSelection:
    """The result of `select_by_coverage`."""

    indices: torch.Tensor
    """Selected latents (indices into the scored pool), by descending score."""

    order: torch.Tensor
    """The whole pool by descending score."""

    coverage_curve: torch.Tensor
    """Cumulative share of the total score covered by the first i+1 latents of `order`."""


def select_by_coverage(scores: torch.Tensor, tau: float = 0.9) -> CoreSelection:
    """The smallest set of latents, by descending score, whose cumulative score reaches `tau` of the total."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau={tau} is invalid: must lie in (0, 1]")
    if (scores < 0).any() or not torch.isfinite(scores).all():
        bad = scores[(scores < 0) | ~torch.isfinite(scores)]
        raise ValueError(f"scores must be finite and non-negative: {len(bad)} are not (e.g. {bad[0].item()})")
    order = torch.argsort(scores, descending=True, stable=True)
    cumulative = scores[order].double().cumsum(0)
    total = cumulative[-1] if len(cumulative) else torch.tensor(0.0, dtype=torch.float64)
    if total <= 0:
        return CoreSelection(order[:0], order, torch.zeros(len(scores), dtype=torch.float64))
    size = int(torch.searchsorted(cumulative, tau * total)) + 1
    return CoreSelection(order[:size], order, cumulative / total)


@dataclass
class AttributionArguments:
    """How cores are selected, and whether selection is followed while training."""

    attribution_tokens: int = field(
        default=16_384,
        metadata={
            "help": "Token positions of the attribution split (held out from training), each scored for every "
            "core; positions a training run would drop (BOS, special tokens, outliers) are dropped here too, "
            "so a few percent fewer are scored."
        },
    )
    attribution_batch_size: int = field(default=8, metadata={"help": "Sequences per LM forward + backward."})
    scorer: Scorer = field(
        default="gxa",
        metadata={
            "help": "A latent's importance at a position (method/scorers.py): gxa, the paper's gradient × "
            "activation from (x, g) pairs harvested once; ablation, the loss change with its decoded part removed "
            "(a downstream forward per latent and batch); integrated_gradients, gradients averaged along the path "
            "from every latent at zero (ig_steps forwards and backwards per batch)."
        },
    )
    aggregation: Aggregation = field(
        default="quantile",
        metadata={"help": "A latent's score from its values over positions: their q-quantile (the paper's) or mean."},
    )
    q: float = field(default=0.99, metadata={"help": "Quantile of a latent's values over positions that scores it."})
    ig_steps: int = field(default=8, metadata={"help": "Points of the path integrated_gradients averages over."})
    scorer_tokens: int = field(
        default=0,
        metadata={
            "help": "Positions of the attribution split that ablation and integrated_gradients score, from its "
            "start (0: all attribution_tokens); gxa scores them all."
        },
    )
    tau: float = field(default=0.9, metadata={"help": "Share of the pool's total score the core must cover."})
    cache_attribution_pairs: bool = field(
        default=True,
        metadata={
            "help": "Harvest the (x, g) pairs once into the cache folder (activation_cache, else "
            "<output_dir>/cache) and reuse them; false: run the LM's forward + backward for every scoring."
        },
    )
    track_selection_steps: int = field(
        default=0,
        metadata={
            "help": "Score the model being trained every this many steps and log the selected core's size "
            "and overlaps (0: only at the end)."
        },
    )
    stop_at_selection_overlap: float = field(
        default=0.0,
        metadata={
            "help": "Stop a cycle's training once the tracked selection's Jaccard overlap with the one before "
            "reaches this `selection_patience` times in a row (0: never)."
        },
    )
    selection_patience: int = field(default=2, metadata={"help": "Tracking points the overlap must hold for."})

    def __post_init__(self):
        check_ranges(
            self,
            attribution_tokens=">= 1",
            attribution_batch_size=">= 1",
            q="(0, 1)",  # q = 0 scores every latent by its minimum over positions: 0 for all
            tau="(0, 1]",
            ig_steps=">= 1",
            scorer_tokens=">= 0",
            track_selection_steps=">= 0",
            selection_patience=">= 1",
            stop_at_selection_overlap="[0, 1]",
        )
        if self.stop_at_selection_overlap and not self.track_selection_steps:
            raise ValueError("stop_at_selection_overlap needs track_selection_steps > 0")


def core_from_scores(sae: DMSAEModel, scores: torch.Tensor, tau: float, **provenance) -> DMSAECore:
    """The coverage-selected core of `sae`'s candidate pool as a `DMSAECore` (its encoder rows as they are: a
    row's scale is a gain for a unit-norm decoder direction, the same in any activation units)."""
    selection = select_by_coverage(scores, tau)
    if len(selection.indices) == 0:
        raise ValueError(
            f"every candidate latent scored 0 (q={provenance.get('q')} over {provenance.get('tokens')} positions): "
            "no core can be selected; lower q or score more positions"
        )
    ids = sae.config.latent_ids()
    rows = sae.W_enc[selection.indices].detach().float().cpu()
    return DMSAECore(
        encoder_rows=rows.clone(),
        latent_ids=[ids[i] for i in selection.indices.tolist()],
        scores=scores[selection.indices].clone(),
        pool_ids=[ids[i] for i in selection.order.tolist()],
        pool_scores=scores[selection.order].clone(),
        coverage_curve=selection.coverage_curve.float(),
        provenance={
            "base_model": sae.config.base_model,
            "hook_layer": sae.config.hook_layer,
            "hook_name": sae.config.hook_name,
            "norm_factor": sae.config.norm_factor,
            "tau": tau,
            "pool_size": len(scores),
            **provenance,
        },
    )


class GradientPairs(Protocol):
    """What `∂L/∂x` is: `(x, g)` pairs at positions no training run reads (an LM's next-token loss,
    `runs.LMGradientPairs`, or a synthetic objective), at most `max_rows` of them."""

    max_rows: int

    def pairs(self) -> Iterable[dict[str, torch.Tensor]]:
        """Blocks `{"activations": [n, d], "gradients": [n, d]}`, the same pairs in the same order at every call."""


class ScoredSource(Protocol):
    """What the scorers read of an activation source (`run.data.ActivationSource`)."""

    def gradient_pairs(self, args: AttributionArguments) -> GradientPairs: ...

    def objective(self, args: AttributionArguments, batch_size: int) -> Objective: ...


class Attribution:
    """Scores SAEs with the chosen scorer on a source's attribution split and selects their cores. GxA reads the
    source's gradient pairs (for an LM harvested once); ablation and integrated gradients its objective."""

    def __init__(self, source: ScoredSource, args: AttributionArguments, batch_size: int):
        """What the scorer reads is laid out now (for an LM, the attribution slice before any training slice)."""
        self.args, self.batch_size = args, batch_size
        self.gradients: GradientPairs | None = source.gradient_pairs(args) if args.scorer == "gxa" else None
        self.objective: Objective | None = source.objective(args, batch_size) if args.scorer != "gxa" else None

    @property
    def max_rows(self) -> int:
        """Positions a scoring reads."""
        return (self.gradients or self.objective).max_rows

    def scores(self, sae: DMSAEModel, progress: bool = True) -> torch.Tensor:
        a = self.args
        with stage("attribution") as timed:
            timed.tokens = self.max_rows
            if a.scorer == "gxa":
                return gxa_scores(
                    sae,
                    self.gradients.pairs(),
                    batch_size=self.batch_size,
                    q=a.q,
                    max_rows=self.max_rows,
                    aggregation=a.aggregation,
                    progress=progress,
                )
            return objective_scores(
                sae, self.objective, a.scorer, q=a.q, aggregation=a.aggregation, ig_steps=a.ig_steps, progress=progress
            )

    def select(self, sae: DMSAEModel, **provenance) -> DMSAECore:
        """Score `sae` and select its core."""
        sae = whole_model(sae)
        scores = self.scores(sae)
        a = self.args
        return core_from_scores(
            sae,
            scores,
            a.tau,
            q=a.q,
            scorer=a.scorer,
            aggregation=a.aggregation,
            tokens=self.max_rows,
            mask_batch_size=self.batch_size,
            **provenance,
        )


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


class AttributionCallback(TrainerCallback):
    """Selects the trained model's core at the end of training (saved as `<output_dir>/core` by the main process),
    and, with `track_selection_steps`, the current model's core every that many steps: its size, its overlap with
    the previous cycle's core and its Jaccard overlap with the selection tracked before are logged, the ids kept in
    `track`; with `stop_at_selection_overlap`, training stops once the selection has settled."""

    def __init__(self, attribution: Attribution, previous_core: list[str] | None = None, **provenance):
        self.attribution, self.provenance = attribution, provenance
        self.previous = set(previous_core or [])
        self.core: DMSAECore | None = None
        self.track: list[dict] = []
        self._stable = 0

    @staticmethod
    def _sae(model) -> DMSAEModel:
        return model.module if hasattr(model, "module") else model

    def on_step_end(self, args, state, control, model=None, **kwargs):
        steps = self.attribution.args.track_selection_steps
        if not steps or state.global_step % steps or state.global_step >= state.max_steps:
            return
        sae = whole_model(self._sae(model))
        selection = select_by_coverage(self.attribution.scores(sae, progress=False), self.attribution.args.tau)
        ids = sae.config.latent_ids()
        chosen = {ids[i] for i in selection.indices.tolist()}
        entry = {"step": state.global_step, "selection_size": len(chosen)}
        if self.previous:
            entry["selection_overlap_previous_core"] = len(chosen & self.previous) / len(self.previous)
        if self.track:
            entry["selection_jaccard_last"] = jaccard(chosen, set(self.track[-1]["ids"]))
        self.track.append({**entry, "ids": sorted(chosen)})
        state.log_history.append(entry)
        logger.info(
            "Step %d: tracked selection of %d latents %s",
            state.global_step,
            len(chosen),
            {k: round(v, 3) for k, v in entry.items() if "overlap" in k or "jaccard" in k},
        )
        threshold = self.attribution.args.stop_at_selection_overlap
        self._stable = self._stable + 1 if threshold and entry.get("selection_jaccard_last", 0) >= threshold else 0
        if self._stable >= self.attribution.args.selection_patience:
            logger.info(
                "Selection stable for %d tracking points: training stops at step %d", self._stable, state.global_step
            )
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        sae = self._sae(model)
        self.core = self.attribution.select(sae, stopped_at_step=state.global_step, **self.provenance)
        if state.is_world_process_zero:
            self.core.save_pretrained(f"{args.output_dir}/core")
        logger.info(
            "Selected a core of %d latents covering %.3f of the attribution", len(self.core), self.core.coverage
        )
        state.log_history.append(
            {"core_size": len(self.core), "core_coverage": self.core.coverage, "step": state.global_step}
        )
