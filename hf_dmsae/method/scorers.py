"""What a latent's importance to the downstream loss is at each scored position, three ways (docs/method.md §3).

- `gxa`: the paper's first-order estimate, `|a_{u,j} · (g_u · ŵ_j)|` with `g_u = ∂L/∂x_u` at the clean activations.
  It needs only the `(x, g)` pairs, harvested once per run.
- `ablation`: the change of each position's loss when latent j's decoded contribution `a_{u,j} · W_dec[j]` is
  removed at every scored position of the sequence, `|ℓ_u(x − a_j ⊗ W_dec[j]) − ℓ_u(x)|`: one downstream forward
  per latent and batch of sequences.
- `integrated_gradients`: `|a_{u,j} · (ḡ_u · ŵ_j)|` with `ḡ_u` the mean of `∂L/∂x_u` at `m` points of the straight
  path from every latent at zero (`x` minus the SAE's whole decoded part, the error term kept) to `x` (right Riemann
  sum, so `m = 1` is GxA): `m` downstream forwards and backwards per batch.

All three are in the same role and the same order of magnitude per position (GxA and IG in the SAE's normalised
units); the aggregation over positions (quantile or mean) is `attribution`'s. The latents and their masks are the
training ones (BatchTopK over the rows scored together), as GxA's.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..data.objective import Objective, ObjectiveBatch
from ..model.kernels import batch_topk_entries
from ..model.modeling_dmsae import DMSAEModel

Scorer = Literal["gxa", "ablation", "integrated_gradients"]
SCORERS: tuple[str, ...] = Scorer.__args__


@torch.no_grad()
def pool_latents(sae: DMSAEModel, acts: torch.Tensor, pool_size: int) -> torch.Tensor:
    """`[B, pool_size]` activations of the first `pool_size` latents for raw activations `acts`, under the training
    masks over these B rows (BatchTopK; the dense core unmasked). Equal to `sae.encode(acts, batch_topk=True)`'s
    first columns, without building the other `[B, n]` latents."""
    config = sae.config
    start = config.first_masked_latent
    x = acts.to(sae.W_dec.dtype) / config.norm_factor
    pre = sae._relu_preactivations(x)
    rows, cols, values = batch_topk_entries(pre[:, start:], config.topk_per_row * len(x))
    cols = cols + start
    latents = torch.zeros(len(x), pool_size, device=x.device, dtype=pre.dtype)
    latents[:, :start] = sae.core_activations(pre[:, :start])
    keep = cols < pool_size
    latents[rows[keep], cols[keep]] = values[keep]
    return latents


def _unit_decoder(sae: DMSAEModel, pool_size: int) -> torch.Tensor:
    decoder = sae.W_dec[:pool_size].float()
    return decoder / decoder.norm(dim=1, keepdim=True)


@torch.no_grad()
def gxa_values(sae: DMSAEModel, acts: torch.Tensor, grads: torch.Tensor, pool_size: int) -> torch.Tensor:
    """`[N, pool_size]` |a · (g · ŵ)| for a training-sized batch of activations and their loss gradients."""
    unit = _unit_decoder(sae, pool_size)
    directional = grads.to(unit.device, torch.float32) @ unit.T
    return (pool_latents(sae, acts.to(unit.device), pool_size).float() * directional).abs()


@torch.no_grad()
def ablation_values(sae: DMSAEModel, objective: Objective, batch: ObjectiveBatch, pool_size: int) -> torch.Tensor:
    """`[kept positions, pool_size]` |change of each position's loss| with one latent's decoded contribution removed
    at every scored position of the batch, latent by latent."""
    x, keep = batch.activations, batch.keep
    latents = pool_latents(sae, x[keep], pool_size)
    decoder = sae.W_dec[:pool_size] * sae.config.norm_factor  # a latent's contribution in raw units
    clean = objective.losses(batch, x)
    values = torch.empty(int(keep.sum()), pool_size, device=latents.device)
    for j in range(pool_size):
        active = latents[:, j] != 0
        if not active.any():  # nothing removed: no change
            values[:, j] = 0
            continue
        ablated = x.clone()
        ablated[keep] -= (latents[:, j, None] * decoder[j]).to(x.dtype)
        values[:, j] = (objective.losses(batch, ablated) - clean)[keep].abs().float()
    return values


@torch.no_grad()
def integrated_gradient_values(
    sae: DMSAEModel, objective: Objective, batch: ObjectiveBatch, pool_size: int, steps: int
) -> torch.Tensor:
    """`[kept positions, pool_size]` |a · (ḡ · ŵ)|, `ḡ` the mean gradient at `steps` points `α = 1/m … 1` of the path
    `x − (1 − α) · D`, `D` the SAE's decoded part (every latent, without the decoder bias) at the scored positions."""
    if steps < 1:
        raise ValueError(f"steps={steps} is invalid: integrated gradients need at least 1")
    x, keep = batch.activations, batch.keep
    kept = x[keep]
    latents = sae.encode(kept, batch_topk=True)
    decoded = (sae.decode(latents) - sae.b_dec * sae.config.norm_factor).to(x.dtype)
    mean_gradient = torch.zeros(len(kept), x.shape[-1], device=x.device, dtype=torch.float32)
    for step in range(1, steps + 1):
        point = x.clone()
        point[keep] = kept - (1 - step / steps) * decoded
        mean_gradient += objective.gradients(batch, point)[keep].float() / steps
    unit = _unit_decoder(sae, pool_size)
    return (latents[:, :pool_size].float() * (mean_gradient @ unit.T)).abs()
