"""Sparse kernels of the training step: exact BatchTopK without a full sort, and an encoder, decoder and backward
that touch only the kept activations.

The only dense `[B, n]` work is the encoder's matmul (the cost no sparsity can remove). BatchTopK keeps `K = k · B`
entries: `batch_topk_entries` finds them among each row's top candidates, widening only rows that could hold more,
so it stays exact. The kept entries travel as `(rows, cols, values)` grouped by row; decoding is one `embedding_bag`
over decoder rows for all Matryoshka groups; `SparseEncode`'s backward builds the encoder gradients from the kept
entries alone (sparsify's approach, adapted to a variable count per row).

`hf_dmsae.sparsity` keeps the plain reference implementation; tests check these against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


ONE_TOPK_DEVICES = {"cuda"}
"""Devices where `batch_topk_entries` selects with one `topk` over the whole batch (no step waits for the device)
rather than by the candidate search (faster on a CPU)."""


def batch_topk_entries(z: torch.Tensor, k_total: int, candidates_per_row: int | None = None):
    """The `k_total` largest entries of `z` `[B, m]` over the whole batch, as `(rows, cols, values)` grouped by row
    (in row order). Exactly `batch_topk`'s selection (ties aside), without sorting all `B · m` values.

    Each row offers its top candidates (twice the mean share by default); the `k_total`-th largest candidate is
    the threshold. A row whose every candidate reaches it may hold more: such rows offer four times as many, until
    none is saturated (at worst the whole row), so the selection is exact."""
    batch, width = z.shape
    k_total = min(k_total, z.numel())
    if z.device.type in ONE_TOPK_DEVICES:
        return _batch_topk_entries_in_one_topk(z, k_total)
    mean_share = math.ceil(k_total / batch)
    per_row = min(width, max(mean_share, candidates_per_row or 2 * mean_share))
    values, cols = z.topk(per_row, dim=1, sorted=False)
    counts = torch.full((batch,), per_row, device=z.device)
    values, cols = values.flatten(), cols.flatten()
    while True:
        threshold = values.kthvalue(values.numel() - k_total + 1).values
        rows = torch.repeat_interleave(torch.arange(batch, device=z.device), counts)
        row_minimum = torch.full((batch,), torch.inf, device=z.device).scatter_reduce(0, rows, values, "amin")
        saturated = torch.nonzero((row_minimum >= threshold) & (counts < width)).squeeze(1)
        if len(saturated) == 0:
            break
        per_row = min(width, 4 * per_row)
        more_values, more_cols = z[saturated].topk(per_row, dim=1, sorted=False)
        keep = ~torch.isin(rows, saturated)
        counts[saturated] = per_row
        values, cols, rows = (
            torch.cat([values[keep], more_values.flatten()]), torch.cat([cols[keep], more_cols.flatten()]),
            torch.cat([rows[keep], torch.repeat_interleave(saturated, per_row)]),
        )  # fmt: skip
        order = torch.argsort(rows, stable=True)
        values, cols = values[order], cols[order]
    # Everything above the threshold, then as many entries equal to it as fill k_total (ties in row order).
    chosen = values > threshold
    ties = torch.nonzero(values == threshold).squeeze(1)[: k_total - int(chosen.sum())]
    chosen[ties] = True
    return rows[chosen], cols[chosen], values[chosen]


def _batch_topk_entries_in_one_topk(z: torch.Tensor, k_total: int):
    """`batch_topk_entries` as one `topk` over all `B · m` values: on a GPU the candidate search's widening loop and
    its tie count would wait for the device, while one large `topk` is fast there."""
    values, flat = z.flatten().topk(k_total, sorted=False)
    rows, cols = flat.div(z.shape[1], rounding_mode="floor"), flat.remainder(z.shape[1])
    order = torch.argsort(rows, stable=True)
    return rows[order], cols[order], values[order]


def bag_offsets(index: torch.Tensor, size: int) -> torch.Tensor:
    """Where each of the `size` bags starts among entries sorted by bag (`index < size`: each entry's bag), as
    `embedding_bag` takes them. Counted with `index_add_`, not `bincount`: a CUDA `bincount` reads the maximum back
    to size its output, which waits for the device."""
    counts = torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))
    return torch.cumsum(counts, 0) - counts


class SparseEncode(torch.autograd.Function):
    """`z = ReLU(x_c W_encᵀ + b_enc)`; the first `start` columns (the dense core) returned whole, BatchTopK of
    `k_total` entries over the rest returned as `(rows, cols, values)` (cols counted from 0 = first latent).

    Backward touches only the kept entries and the core: `∂W_enc`, `∂b_enc`, `∂x_c` without a dense `[B, n]`
    gradient. The frozen rows get no gradient (they are not an input)."""

    @staticmethod
    def forward(ctx, x_c, W_frozen, W_trainable, b_enc, start: int, k_total: int):
        with torch.no_grad():
            compute_dtype = torch.get_autocast_dtype("cpu" if x_c.device.type == "cpu" else x_c.device.type)
            autocast = torch.is_autocast_enabled(x_c.device.type)
            dtype = compute_dtype if autocast else x_c.dtype
            W_enc = torch.cat([W_frozen, W_trainable]).to(dtype)
            pre = torch.addmm(b_enc.to(dtype), x_c.to(dtype), W_enc.T).float()
            pre.relu_()
            core = pre[:, :start].contiguous()
            rows, cols, values = batch_topk_entries(pre[:, start:], k_total)
            cols = cols + start
        ctx.save_for_backward(x_c, W_enc, core, rows, cols, values)
        ctx.frozen_rows = W_frozen.shape[0]
        ctx.mark_non_differentiable(rows, cols)
        return core, rows, cols, values

    @staticmethod
    def backward(ctx, grad_core, grad_rows, grad_cols, grad_values):
        x_c, W_enc, core, rows, cols, values = ctx.saved_tensors
        batch, d = x_c.shape
        n, f, start = W_enc.shape[0], ctx.frozen_rows, core.shape[1]
        grad_values = grad_values * (values > 0)  # ReLU: kept zeros pass no gradient
        grad_core = grad_core * (core > 0) if grad_core is not None else torch.zeros_like(core)
        W = W_enc.float()

        grad_b_enc = torch.zeros(n, device=x_c.device).index_add_(0, cols, grad_values)
        grad_b_enc[:start] += grad_core.sum(0)

        # ∂x_c = (∂pre) W_enc: the dense core part, plus one embedding_bag over the kept entries (sorted by row).
        grad_x = grad_core @ W[:start] if start else torch.zeros(batch, d, device=x_c.device)
        grad_x = grad_x + F.embedding_bag(cols, W, bag_offsets(rows, batch), mode="sum",
                                          per_sample_weights=grad_values)  # fmt: skip

        # ∂W_enc[j] = Σ over kept entries of latent j of ∂pre · x_c[row]: entries sorted by column, bagged over x_c.
        grad_W = None
        if ctx.needs_input_grad[2]:
            by_col = torch.argsort(cols, stable=True)
            grad_W = F.embedding_bag(rows[by_col], x_c.float(), bag_offsets(cols, n), mode="sum",
                                     per_sample_weights=grad_values[by_col])  # fmt: skip
            if start > f:  # trainable core rows see the dense core gradient
                grad_W[f:start] += grad_core[:, f:].T @ x_c.float()
            grad_W = grad_W[f:].to(W_enc.dtype)
        return grad_x.to(x_c.dtype), None, grad_W, grad_b_enc, None, None


def sparse_decode_groups(core_latents, rows, cols, values, W_dec, b_dec, group_ends: list[int], batch: int):
    """Cumulative Matryoshka reconstructions `[b_dec + Σ_{j < end} a_j W_dec[j] for end in group_ends]` from the dense
    core `[B, c]` and the kept entries, touching only decoder rows that are active: one `embedding_bag` whose bags
    are (row, group) pairs, then a cumulative sum over groups."""
    start, groups = core_latents.shape[1], len(group_ends)
    bag = rows * groups + torch.bucketize(cols, torch.tensor(group_ends, device=cols.device), right=True)
    bag, order = bag.sort(stable=True)
    # In the decoder's dtype (bf16 weights under FSDP's mixed precision): embedding_bag needs matching dtypes.
    per_group = F.embedding_bag(cols[order], W_dec, bag_offsets(bag, batch * groups), mode="sum",
                                per_sample_weights=values[order].to(W_dec.dtype))  # fmt: skip
    reconstruction = b_dec + core_latents.to(W_dec.dtype) @ W_dec[:start] if start else b_dec.expand(batch, -1)
    reconstructions = []
    for group in per_group.view(batch, groups, -1).unbind(1):  # a running sum: cumsum over dim 1 is slow on CPU
        reconstruction = reconstruction + group
        reconstructions.append(reconstruction)
    return reconstructions
