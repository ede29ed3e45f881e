"""Progressive coding (seed paper "Empirical Evaluation of Progressive Coding for Sparse Autoencoders"): how well the
first G latents of an SAE reconstruct, for its own order (a Matryoshka SAE's nested groups) or for a permutation of a
trained SAE by a usage statistic (permutation coding: mean squared activation, or frequency).

A prefix keeps the latents the full model selects (inference mode, its threshold) that lie among the first G of the
order and drops the rest, the reconstruction a Matryoshka prefix loss trains for. `reorder_latents` turns a trained
SAE into that progressive coder: the same model with its latents in the new order, to save or push as any other.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..model.modeling_dmsae import DMSAEModel
from .held_out import fvu_sums, load_metric


@torch.no_grad()
def latent_statistics(sae: DMSAEModel, activations: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per latent over batches of raw activations (inference mode): `frequency` (share of rows where it fires) and
    `mean_squared` (its mean squared activation, zeros included)."""
    was_training = sae.training
    sae.eval()
    fired = torch.zeros(sae.config.dict_size, dtype=torch.float64, device=sae.device)
    squared = torch.zeros_like(fired)
    rows = 0
    for x in activations:
        latents = sae.encode(x.to(sae.device)).double()
        fired += (latents != 0).sum(0)
        squared += latents.pow(2).sum(0)
        rows += len(x)
    sae.train(was_training)
    if rows == 0:
        raise ValueError("no activations were given")
    return {"frequency": (fired / rows).float().cpu(), "mean_squared": (squared / rows).float().cpu()}


def order_by(statistic: torch.Tensor) -> torch.Tensor:
    """Latent indices by descending `statistic` (ties by index): the permutation coding of that statistic."""
    return torch.argsort(statistic, descending=True, stable=True)


@torch.no_grad()
def prefix_fvu(
    sae: DMSAEModel, activations: Iterable[torch.Tensor], prefix_sizes: list[int], order: torch.Tensor | None = None
) -> dict[int, float]:
    """FVU of the reconstruction from each prefix of `prefix_sizes` latents of `order` (default: the model's own
    latent order), over batches of raw activations."""
    n = sae.config.dict_size
    if not prefix_sizes or min(prefix_sizes) < 1 or max(prefix_sizes) > n:
        raise ValueError(f"prefix_sizes={prefix_sizes} is invalid: each must lie in [1, dict_size={n}]")
    order = torch.arange(n) if order is None else order.cpu()
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    rank = rank.to(sae.device)
    was_training = sae.training
    sae.eval()
    metrics = {g: load_metric("fvu") for g in prefix_sizes}
    for x in activations:
        x = x.to(sae.device)
        latents = sae.encode(x)
        for g, metric in metrics.items():
            metric.add(**fvu_sums(x, sae.decode(latents * (rank < g))))
    sae.train(was_training)
    return {g: metric.compute()["fvu"] for g, metric in metrics.items()}


@torch.no_grad()
def reorder_latents(sae: DMSAEModel, order: torch.Tensor) -> DMSAEModel:
    """A copy of `sae` whose latent i is `sae`'s latent `order[i]` (encoder row and bias, decoder row, dead-latent
    count): the same reconstructions, latents in a new order. A core stays where it is: `order` must begin with
    `0 … core_size−1`."""
    config, n = sae.config, sae.config.dict_size
    order = order.cpu().long()
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"order is not a permutation of the {n} latents")
    if not torch.equal(order[: config.core_size], torch.arange(config.core_size)):
        raise ValueError(
            f"order moves core latents: its first {config.core_size} entries must be 0 … {config.core_size - 1}"
        )
    reordered = DMSAEModel(config.__class__.from_dict(config.to_dict())).to(sae.device)
    reordered.load_state_dict(sae.state_dict())
    noncore = order[config.core_size :] - config.core_size
    reordered.W_enc_trainable.copy_(sae.W_enc_trainable[noncore])
    for name in ("b_enc", "W_dec", "tokens_since_fired"):
        getattr(reordered, name).copy_(getattr(sae, name)[order])
    return reordered
