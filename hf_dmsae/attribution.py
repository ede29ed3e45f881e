"""Attribution-guided core selection (SPEC section 3, Eq. 6 and 7).

For each sampled token position `u` of a clean LM forward pass (no SAE spliced in): `x_u` the activation at the
hook, `g_u = ∂L/∂x_u` the gradient of the next-token loss, `a_{u,j}` the SAE's activation of candidate latent `j`
(training masks over the batch), `ŵ_j` its unit decoder direction; `GxA_{u,j} = |a_{u,j} · (g_u · ŵ_j)|`. A latent's
score is the exact q-quantile of its GxA over all sampled positions, zeros included, computed in one streaming pass
that keeps only the top `⌈(1−q)·N⌉+1` values per latent. The core is the smallest set of latents, by descending
score, whose summed score reaches `τ` of the pool's total.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .activations import ActivationArguments, LayerActivations, TrainingPositions, text_batches
from .core import DMSAECore
from .modeling_dmsae import DMSAEModel

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
        merged = torch.cat([self.top.to(rows.device, rows.dtype), rows.T], dim=1)
        self.top = merged.topk(min(self.keep, merged.shape[1]), dim=1).values
        self.count += len(rows)

    def merge(self, tops: torch.Tensor, count: int) -> None:
        """Fold in another stream's kept values `[num_columns, m]` (e.g. from another process) and its count."""
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


def gxa_values(sae: DMSAEModel, acts: torch.Tensor, grads: torch.Tensor, pool_size: int) -> torch.Tensor:
    """`[N, pool_size]` |a · (g · ŵ)| for rows of activations and their loss gradients."""
    latents = sae.encode(acts, batch_topk=True)[:, :pool_size].float()
    decoder = sae.W_dec[:pool_size].float()
    directional = grads.float() @ (decoder / decoder.norm(dim=1, keepdim=True)).T
    return (latents * directional).abs()


@torch.no_grad()
def gxa_scores(
    sae: DMSAEModel,
    lm: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    positions: TrainingPositions,
    max_tokens: int,
    q: float = 0.99,
) -> torch.Tensor:
    """Score each candidate latent (core ∪ prefix-0) by the q-quantile of its GxA over up to `max_tokens` positions.

    `batches` yields `input_ids` `[B, T]`; `positions` decides which positions count (those an SAE trains on).
    Under `torch.distributed`, process r of W takes batches r, r+W, … and an equal share of the tokens; the kept
    values are merged at the end, so every process returns the scores of all positions.
    """
    config = sae.config
    pool = config.candidate_pool_size
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    quota = max_tokens // world + (1 if rank < max_tokens % world else 0)
    layer = LayerActivations(lm, config.hook_layer, config.hook_name)
    quantile = StreamingQuantile(pool, q, max_tokens)
    progress = tqdm(total=quota, desc="attribution", unit="tok", unit_scale=True, disable=rank != 0)
    for index, input_ids in enumerate(batches):
        if index % world != rank:
            continue
        acts, grads = layer.with_gradient(input_ids.to(lm.device))
        keep = positions.mask(input_ids.to(lm.device), acts)
        remaining = quota - quantile.count
        acts, grads = acts[keep][:remaining], grads[keep][:remaining]
        if len(acts):
            quantile.update(gxa_values(sae, acts, grads, pool).cpu())
            progress.update(len(acts))
        if quantile.count >= quota:
            break
    progress.close()
    quantile.gather(lm.device)
    return quantile.compute()


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
        raise ValueError("scores must be finite and non-negative")
    order = torch.argsort(scores, descending=True, stable=True)
    cumulative = scores[order].double().cumsum(0)
    total = cumulative[-1] if len(cumulative) else torch.tensor(0.0, dtype=torch.float64)
    if total <= 0:
        return CoreSelection(order[:0], order, torch.zeros(len(scores), dtype=torch.float64))
    size = int(torch.searchsorted(cumulative, tau * total)) + 1
    return CoreSelection(order[:size], order, cumulative / total)


@dataclass
class AttributionArguments:
    """How a core is selected."""

    attribution_tokens: int = 16_384
    """Token positions scored."""

    attribution_batch_size: int = 8
    """Sequences per LM forward + backward."""

    q: float = 0.99
    """Quantile of |GxA| over positions that scores a latent."""

    tau: float = 0.9
    """Share of the pool's total score the core must cover."""


def select_core(
    sae: DMSAEModel, lm, tokenizer, activation_args: ActivationArguments, args: AttributionArguments, **provenance
) -> DMSAECore:
    """Score the candidate pool of `sae` and select its core as a `DMSAECore`."""
    positions = TrainingPositions(tokenizer, activation_args.outlier_norm_ratio)
    batches = text_batches(activation_args, tokenizer, args.attribution_batch_size, activation_args.dataset_split)
    scores = gxa_scores(sae, lm, batches, positions=positions, max_tokens=args.attribution_tokens, q=args.q)
    selection = select_by_coverage(scores, args.tau)
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
            "base_model": sae.config.base_model, "hook_layer": sae.config.hook_layer,
            "hook_name": sae.config.hook_name, "norm_factor": sae.config.norm_factor, "q": args.q, "tau": args.tau,
            "tokens": args.attribution_tokens, "pool_size": len(scores), **provenance,
        },  # fmt: skip
    )


class AttributionCallback(TrainerCallback):
    """At the end of training, scores the trained SAE's candidate pool (every process its share of the tokens),
    selects its core, saves it as `<output_dir>/core` from the main process and logs its size and coverage."""

    def __init__(self, lm, tokenizer, activation_args: ActivationArguments, args: AttributionArguments, **provenance):
        self.lm, self.tokenizer, self.activation_args, self.args = lm, tokenizer, activation_args, args
        self.provenance = provenance
        self.core: DMSAECore | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        sae = whole_model(model.module if hasattr(model, "module") else model)
        was_training = sae.training
        self.core = select_core(sae.eval(), self.lm, self.tokenizer, self.activation_args, self.args,
                                **self.provenance)  # fmt: skip
        sae.train(was_training)
        if state.is_world_process_zero:
            self.core.save_pretrained(f"{args.output_dir}/core")
        logger.info("Selected a core of %d latents covering %.3f of the attribution", len(self.core),
                    self.core.coverage)  # fmt: skip
        state.log_history.append({"core_size": len(self.core), "core_coverage": self.core.coverage,
                                  "step": state.global_step})  # fmt: skip


def whole_model(sae: DMSAEModel) -> DMSAEModel:
    """`sae` itself, or for FSDP-sharded weights an unsharded copy on every process (for scoring)."""
    if not isinstance(sae.W_dec, DTensor):
        return sae
    state = get_model_state_dict(sae, options=StateDictOptions(full_state_dict=True))
    whole = DMSAEModel(sae.config).to(sae.b_enc.device)
    whole.load_state_dict(state)
    return whole
