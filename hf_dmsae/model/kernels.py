"""Sparse kernels of the training step: exact BatchTopK without a full sort, and an encoder, decoder and backward
that touch only the kept activations.

The only dense `[B, n]` work is the encoder's matmul (the cost no sparsity can remove). BatchTopK keeps `K = k · B`
entries: `batch_topk_entries` finds them at or above a bound read from a sample of the values, lowering it where the
sample misleads, so it stays exact. The kept entries travel as `(rows, cols, values)` in (row, column) order;
decoding sums the active decoder rows with `embedding_bag`, fused with the prefix losses; the backward passes
(`SparseEncode`, `SparseMatryoshkaLoss`) build every gradient from the kept entries alone (sparsify's approach,
adapted to a variable count per row).

`hf_dmsae.sparsity` keeps the plain reference implementation; tests check these against it.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

ONE_TOPK_DEVICES = {"cuda"}
"""Devices where `batch_topk_entries` selects with one `topk` over the whole batch (no step waits for the device)
rather than above a sampled bound (faster on a CPU, where a `topk` over `B · m` values or per row is slow)."""

SAMPLE_SIZE = 2**16
"""Values of `z` (at evenly spaced positions, over every row and column) from which the CPU selection estimates its
bound."""

SAMPLE_MARGIN = 1.5
"""The bound is the sample's value at `SAMPLE_MARGIN` times the kept share: about that many times `k_total`
candidates (1.41–1.57 over 16 batches of SmolLM2's activations; a sample of whole rows four times as large gave
1.32–1.62)."""

SAMPLE_BRACKET = 0.15
"""The exact threshold among the candidates is first looked for between the sample's values at `1 ± SAMPLE_BRACKET`
times the kept share (~30% of `k_total` candidates, not ~150%: 1.8 instead of 5.3 ms at the bench's size), among
all candidates where that bracket misses it (on 48 batches of SmolLM2's activations, under three models, 78–91% of
`k_total` were above the one value and 109–121% reached the other: it held every time)."""


def batch_topk_entries(z: torch.Tensor, k_total: int, sample_size: int = SAMPLE_SIZE):
    """The `k_total` largest entries of `z` `[B, m]` over the whole batch, as `(rows, cols, values)` in (row,
    column) order. Exactly `batch_topk`'s selection (ties aside), without sorting all `B · m` values.

    On a CPU: a lower bound on the `k_total`-th largest value is read from a sample of the values; every entry at or
    above it is a candidate, and the top `k_total` candidates are kept. Where the sample misleads and fewer than
    `k_total` entries reach the bound, it is lowered (four times as deep into the sample, at worst to every entry),
    so the selection is exact whatever the values. The `k_total`-th largest candidate is looked for first between
    two more of the sample's values (`SAMPLE_BRACKET`)."""
    width = z.shape[1]
    k_total = min(k_total, z.numel())
    if z.device.type in ONE_TOPK_DEVICES:
        return _batch_topk_entries_in_one_topk(z, k_total)
    every_value = z.contiguous().view(-1)
    sample = every_value.index_select(0, sample_positions(z.shape, sample_size).to(z.device))
    share = k_total * len(sample) / z.numel()  # how many sampled values the kept ones should hold
    depth = math.ceil(SAMPLE_MARGIN * share)
    candidates = reused_cpu_buffer("candidates", (z.numel(),), torch.bool, z.device)
    while True:
        top = sample.topk(min(depth, len(sample))).values  # sorted, largest first
        bound = float(top[-1]) if depth < len(sample) else -math.inf
        # Flat positions: one index per candidate to write and to gather by (rows and columns for the kept only).
        flat = torch.nonzero(torch.ge(every_value, bound, out=candidates)).squeeze(1)
        if len(flat) >= k_total or depth >= len(sample):
            break
        depth *= 4
    values = every_value.index_select(0, flat)
    k_total = min(k_total, len(values))  # fewer only where z holds NaN (never ≥ a bound)
    if k_total:
        high, low = (_sorted_value(top, math.floor((1 - side * SAMPLE_BRACKET) * share)) for side in (1, -1))
        threshold = _kth_largest(values, k_total, high, low)
        # Everything above the threshold, then as many equal to it as fill k_total (ties in (row, column) order).
        chosen = values > threshold
        if missing := k_total - int(torch.count_nonzero(chosen)):
            chosen[torch.nonzero(values == threshold).squeeze(1)[:missing]] = True
        keep = torch.nonzero(chosen).squeeze(1)
        flat, values = flat.index_select(0, keep), values.index_select(0, keep)
    return *_rows_and_columns(flat, width), values


def _rows_and_columns(flat: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and columns of flat positions in a tensor `width` columns wide."""
    return flat.div(width, rounding_mode="floor"), flat.remainder(width)


def _sorted_value(top: torch.Tensor, depth: int) -> float:
    """The `depth`-th largest of the values `top` holds, sorted largest first: `inf` above the first, `-inf` past
    the last."""
    if depth < 1:
        return math.inf
    return float(top[depth - 1]) if depth <= len(top) else -math.inf


def _kth_largest(values: torch.Tensor, k: int, high: float, low: float) -> torch.Tensor:
    """The `k`-th largest of `values` (counting repeats), looked for among those in `[low, high]` where fewer than
    `k` exceed `high` and at least `k` reach `low` (then it is one of them), among all otherwise."""
    above = int(torch.count_nonzero(values > high))
    if above < k:
        between = values[(values >= low) & (values <= high)]
        if above + len(between) >= k:
            return between.kthvalue(len(between) - (k - above) + 1).values
    return values.kthvalue(len(values) - k + 1).values


def sample_positions(shape: tuple[int, int], size: int) -> torch.Tensor:
    """About `size` evenly spaced flat positions in a `[B, m]` tensor, the step coprime with `m`: they fall on every
    column, not on the few a step sharing a factor with `m` would repeat."""
    numel, width = math.prod(shape), shape[1]
    step = max(1, numel // size)
    while math.gcd(step, width) != 1:
        step += 1
    return torch.arange(step // 2, numel, step)


def _batch_topk_entries_in_one_topk(z: torch.Tensor, k_total: int):
    """`batch_topk_entries` as one `topk` over all `B · m` values: on a GPU the bound's search and its tie count
    would wait for the device, while one large `topk` is fast there."""
    values, flat = z.flatten().topk(k_total, sorted=False)
    flat, order = flat.sort()
    return *_rows_and_columns(flat, z.shape[1]), values.index_select(0, order)


def stable_order(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """`argsort(keys, stable=True)` of integer keys in `[0, bound)`, sorted in the narrowest integer dtype that holds
    them (the bench's 258k entries: 0.5 ms by uint8 group, 0.6 by int16 column, 1.7–1.9 as int64)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound - 1 <= torch.iinfo(dtype).max:
            return torch.argsort(keys.to(dtype), stable=True)
    return torch.argsort(keys, stable=True)


def bag_bounds(index: torch.Tensor, size: int) -> torch.Tensor:
    """Where each of the `size` bags starts among entries sorted by bag (`index < size`: each entry's bag), and where
    the last ends: `[size + 1]`, the first `size` being the offsets `embedding_bag` takes. Counted with `index_add_`,
    not `bincount`: a CUDA `bincount` reads the maximum back to size its output, which waits for the device."""
    bounds = torch.zeros(size + 1, dtype=torch.long, device=index.device)
    bounds[1:].index_add_(0, index, torch.ones_like(index))
    return bounds.cumsum_(0)


_reused = threading.local()


def reused_cpu_buffer(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """On a CPU, an uninitialised tensor that this thread's next call for `name` hands out again (the same memory,
    grown as needed); elsewhere `None`, the `out=` that makes a fresh tensor. For the step's large temporaries (the
    `[B, n]` pre-activations and candidates' mask, the matmul's centred inputs and whole encoder, the prefixes'
    residuals): a fresh CPU tensor of that size is mapped anew by the OS at every step, and its page faults cost as
    much as ~15% of the encoder's matmul (on CUDA the caching allocator reuses blocks already). Nothing a step
    returns may point into one; what a backward reads from one must check that its `_version` (shared by every view
    of the buffer) has not moved since."""
    if device.type != "cpu":
        return None
    size = math.prod(shape)
    buffers = _reused.__dict__.setdefault("buffers", {})
    key = (name, dtype)
    if key not in buffers or buffers[key].numel() < size:
        buffers.pop(key, None)  # freed before the larger one is allocated
        buffers[key] = torch.empty(size, dtype=dtype)
    return buffers[key][:size].view(shape)


def release_reused_buffers() -> None:
    """Free this thread's reused buffers (held from one training step to the next; `DMSAETrainer` releases them when
    training ends). At the paper's scale on a CPU they hold ~2.2 GB between steps."""
    _reused.__dict__.pop("buffers", None)


class SparseEncode(torch.autograd.Function):
    """`z = ReLU((x − b_dec) W_encᵀ + b_enc)`; the first `start` columns (the dense core; without the ReLU unless
    `core_relu`, as in a `linear_core`) returned whole, BatchTopK of `k_total` entries over the rest returned as
    `(rows, cols, values)` (cols counted from 0 = first latent), and `by_col`, the entries' order by column, which
    this backward and `SparseMatryoshkaLoss`'s both bag by.

    Backward touches only the kept entries and the core: `∂W_enc`, `∂b_enc` and `∂b_dec` without a dense `[B, n]`
    gradient. `∂b_dec = −(Σ_rows ∂pre) W_enc = −∂b_enc · W_enc` needs no per-row gradient; the per-row `∂x` (one
    more pass over the kept entries) is built only when `x` requires it; `∂W_enc` bags the rows of `x`, less a
    rank-one `∂b_enc ⊗ b_dec`, so the centred inputs need not outlive the forward. The frozen rows get no gradient
    (a buffer, not a parameter)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_frozen, W_trainable, b_enc, start: int, k_total: int, core_relu: bool = True):
        with torch.no_grad():
            compute_dtype = torch.get_autocast_dtype("cpu" if x.device.type == "cpu" else x.device.type)
            autocast = torch.is_autocast_enabled(x.device.type)
            dtype = compute_dtype if autocast else x.dtype
            # The centred inputs and the whole encoder serve the matmul only (the backward reads x, b_dec and the
            # two blocks of rows): on a CPU in reused buffers.
            x_c = torch.sub(
                x, b_dec, out=reused_cpu_buffer("centred inputs", x.shape, torch.result_type(x, b_dec), x.device)
            )
            n = W_frozen.shape[0] + W_trainable.shape[0]
            W_enc = torch.cat(
                [W_frozen.to(dtype), W_trainable.to(dtype)],
                out=reused_cpu_buffer("encoder", (n, x.shape[1]), dtype, x.device),
            )
            out = reused_cpu_buffer("preactivations", (x.shape[0], n), dtype, x.device)
            pre = torch.addmm(b_enc.to(dtype), x_c.to(dtype), W_enc.T, out=out)
            # ReLU on what is kept only (new tensors: nothing returned or saved may point into a reused buffer). The
            # selection on the raw values keeps the same positive entries; where fewer than k_total are positive, the
            # others it keeps are zeros after ReLU either way.
            core = (F.relu(pre[:, :start]) if core_relu else pre[:, :start].clone()).float()
            # The core's columns (copied out above) are never selected: BatchTopK over the whole buffer, so that a
            # GPU's one topk flattens it without copying the [B, n − c] rest (1 GB at the paper's scale).
            pre[:, :start] = -math.inf
            rows, cols, values = batch_topk_entries(pre, min(k_total, x.shape[0] * (n - start)))
            values = values.relu_().float()  # fresh from the selection: in place
            by_col = stable_order(cols, n)
        ctx.save_for_backward(x, b_dec, W_frozen, W_trainable, core, rows, cols, values, by_col)
        ctx.mark_non_differentiable(rows, cols, by_col)
        ctx.core_relu = core_relu
        return core, rows, cols, values, by_col

    @staticmethod
    def backward(ctx, grad_core, grad_rows, grad_cols, grad_values, grad_by_col):
        x, b_dec, W_frozen, W_trainable, core, rows, cols, values, by_col = ctx.saved_tensors
        batch, d = x.shape
        f, start = W_frozen.shape[0], core.shape[1]
        n = f + W_trainable.shape[0]
        grad_values = grad_values * (values > 0)  # ReLU: kept zeros pass no gradient
        if grad_core is None:
            grad_core = torch.zeros_like(core)
        elif ctx.core_relu:
            grad_core = grad_core * (core > 0)

        grad_b_enc = torch.zeros(n, device=x.device).index_add_(0, cols, grad_values)
        grad_b_enc[:start] += grad_core.sum(0)

        grad_x = grad_b_dec = None
        if ctx.needs_input_grad[0]:  # ∂x = (∂pre) W_enc: the dense core part, plus a bag over the kept entries
            W = torch.cat([W_frozen, W_trainable]).float()
            grad_x = grad_core @ W[:start] if start else torch.zeros(batch, d, device=x.device)
            grad_x = grad_x + F.embedding_bag(
                cols, W, bag_bounds(rows, batch)[:-1], mode="sum", per_sample_weights=grad_values
            )
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(grad_b_enc[:f] @ W_frozen.float() + grad_b_enc[f:] @ W_trainable.float()).to(b_dec.dtype)

        # ∂W_enc = (∂pre)ᵀ (x − b_dec) = (∂pre)ᵀ x − ∂b_enc ⊗ b_dec: over the kept entries sorted by column, a bag
        # of the rows of x, then one rank-one update.
        grad_W = None
        if ctx.needs_input_grad[3]:
            x32 = x.float()
            grad_W = F.embedding_bag(
                rows.index_select(0, by_col),
                x32,
                bag_bounds(cols, n)[:-1],
                mode="sum",
                per_sample_weights=grad_values.index_select(0, by_col),
            )
            if start > f:  # trainable core rows see the dense core gradient
                grad_W[f:start] += grad_core[:, f:].T @ x32
            grad_W = grad_W[f:].addr_(grad_b_enc[f:], b_dec.float(), alpha=-1).to(W_trainable.dtype)
        return grad_x, grad_b_dec, None, grad_W, grad_b_enc, None, None, None


BLOCKED_DECODE_DEVICES = {"cpu"}
"""Devices where the decoder's bag sums are computed in blocks of about `DECODE_BLOCK_BYTES`, each added into the
residuals as it comes: all `G · B` sums at once are a fresh allocation of `G · B · d` values (47 MB at the bench's
4096 latents), which a CPU's OS maps anew at every step, at twice the cost of the sums' arithmetic, while a block
that size is reused from the heap (decoder and residuals 14 ms instead of 30). Elsewhere one `embedding_bag`: the
blocks' bounds would be read back from the device, and a GPU's caching allocator reuses the whole output."""

DECODE_BLOCK_BYTES = 2**20
"""About the size of those blocks (455 rows of 576 fp32 values): one freed at a time stays in the heap."""


class SparseMatryoshkaLoss(torch.autograd.Function):
    """The prefix losses `‖x − x̂_g‖²` (summed over features, averaged over rows, fp32) of the cumulative Matryoshka
    reconstructions `x̂_g = b_dec + core · W_dec[:c] + Σ_{kept entries of groups ≤ g} a_j W_dec[j]`, and the full
    reconstruction `x̂_{G−1}`, from the dense core `[B, c]` and the kept entries (`bag`: each entry's (group, row)
    pair, `group · B + row`; `order`, `by_col`: their order by bag and by column).

    The residuals `x̂_g − x` are one fp32 `[G, B, d]` tensor, built group by group from `embedding_bag` sums over
    the active decoder rows (bags group-major), each loss one reduction over its block. Backward turns the residuals
    in place into each bag's gradient (the suffix sum over later prefixes of their residuals' gradients); `∂a` is
    the per-entry dot products `embedding_bag`'s own backward computes; `∂W_dec` one bag over the entries sorted by
    column (torch's `embedding_bag` backward accumulates a dense gradient entry by entry, about twice as slow on a
    CPU). Where the residuals were overwritten before the backward (a reused buffer handed out again, or a second
    backward through the graph) it builds them again."""

    @staticmethod
    def forward(ctx, x, core_latents, values, W_dec, b_dec, cols, bag, order, by_col, groups: int):
        batch = len(x)
        cols_by_bag, bag_by_bag = cols.index_select(0, order), bag.index_select(0, order)
        bounds = bag_bounds(bag, groups * batch)
        residuals = _prefix_residuals(x, core_latents, values, W_dec, b_dec, cols_by_bag, order, bounds, groups)
        losses = torch.linalg.vector_norm(residuals.view(groups, -1), dim=1).square() / batch
        reconstruction = (residuals[-1] + x.float()).to(W_dec.dtype)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            x, core_latents, values, W_dec, b_dec, cols, bag, by_col, order, cols_by_bag, bag_by_bag, bounds
        )
        ctx.residuals, ctx.residuals_version = residuals, residuals._version
        return losses, reconstruction

    @staticmethod
    def backward(ctx, grad_losses, grad_reconstruction):
        x, core_latents, values, W_dec, b_dec, cols, bag, by_col, order, cols_by_bag, bag_by_bag, bounds = (
            ctx.saved_tensors
        )
        table = ctx.residuals
        groups, batch, d = table.shape
        start, n = core_latents.shape[1], W_dec.shape[0]
        if table._version != ctx.residuals_version:
            table = _prefix_residuals(x, core_latents, values, W_dec, b_dec, cols_by_bag, order, bounds, groups)
        if grad_losses is None:
            table.zero_()
        else:  # ∂L_g/∂x̂_g = (2/B) ∂L/∂L_g (x̂_g − x); group g's bags get their sum over g' ≥ g (one pass each)
            scale = (2 / batch) * grad_losses.float()
            table[-1] *= scale[-1]
            for group in range(groups - 2, -1, -1):
                torch.addcmul(table[group + 1], table[group], scale[group], out=table[group])
        grad_x = -table[0].to(x.dtype) if ctx.needs_input_grad[0] else None  # before x̂'s own gradient: not x's
        if grad_reconstruction is not None:  # x̂_{G−1} holds every group's entries
            table += grad_reconstruction.float()
        every_prefix = table[0]  # the gradient of b_dec + the core's part, which every prefix holds
        flat = table.view(groups * batch, d).to(W_dec.dtype)
        grad_core = grad_values = grad_W = grad_b_dec = None
        if ctx.needs_input_grad[1] and start:
            grad_core = (every_prefix @ W_dec[:start].T.float()).to(core_latents.dtype)
        if ctx.needs_input_grad[2]:
            # The op F.embedding_bag's own backward runs for its per-sample weights (mode 0: sum), bag by bag.
            by_bag = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                flat, W_dec, cols_by_bag, bounds[:-1], bag_by_bag, 0
            )
            grad_values = torch.empty_like(values).index_copy_(0, order, by_bag.to(values.dtype))
        if ctx.needs_input_grad[3]:
            grad_W = F.embedding_bag(
                bag.index_select(0, by_col),
                flat,
                bag_bounds(cols, n)[:-1],
                mode="sum",
                per_sample_weights=values.index_select(0, by_col).to(flat.dtype),
            )
            if start:
                grad_W[:start] += (core_latents.float().T @ every_prefix).to(grad_W.dtype)
        if ctx.needs_input_grad[4]:
            grad_b_dec = every_prefix.sum(0).to(W_dec.dtype)
        return grad_x, grad_core, grad_values, grad_W, grad_b_dec, None, None, None, None, None


def _prefix_residuals(x, core_latents, values, W_dec, b_dec, cols_by_bag, order, bounds, groups: int) -> torch.Tensor:
    """`x̂_g − x` for every prefix, `[G, B, d]` in fp32 (a reused buffer on a CPU): `b_dec + core · W_dec[:c] − x`,
    then each group's bag sums added to the previous prefix's residuals (block by block on a CPU:
    `BLOCKED_DECODE_DEVICES`)."""
    (batch, d), start = x.shape, core_latents.shape[1]
    # In the decoder's dtype (bf16 weights under FSDP's mixed precision): embedding_bag needs matching dtypes.
    weights = values.index_select(0, order).to(W_dec.dtype)
    shape = (groups, batch, d)
    residuals = reused_cpu_buffer("residuals", shape, torch.float32, x.device)
    if residuals is None:
        residuals = torch.empty(shape, device=x.device)
    torch.sub(b_dec.float(), x.float(), out=residuals[0])
    if start:
        residuals[0].addmm_(core_latents.float(), W_dec[:start].float())
    for group, first_row, sums in _bag_sums(cols_by_bag, W_dec, weights, bounds, groups, batch):
        block = residuals[group, first_row : first_row + len(sums)]
        if group:
            torch.add(residuals[group - 1, first_row : first_row + len(sums)], sums, out=block)
        else:
            block += sums
    return residuals


def _bag_sums(cols_by_bag, W_dec, weights, bounds, groups: int, batch: int):
    """The bags' sums `Σ a_j W_dec[j]`, group by group, as `(group, first row, sums [rows, d])`."""
    if bounds.device.type not in BLOCKED_DECODE_DEVICES:
        sums = F.embedding_bag(cols_by_bag, W_dec, bounds[:-1], mode="sum", per_sample_weights=weights)
        yield from ((group, 0, block) for group, block in enumerate(sums.view(groups, batch, -1)))
        return
    rows_per_block = max(1, DECODE_BLOCK_BYTES // (W_dec.shape[1] * W_dec.element_size()))
    blocks = [(group, row) for group in range(groups) for row in range(0, batch, rows_per_block)]
    first_bags = [group * batch + row for group, row in blocks] + [groups * batch]
    first_entries = bounds[first_bags].tolist()
    for i, (group, row) in enumerate(blocks):
        low, high = first_entries[i], first_entries[i + 1]
        offsets = bounds[first_bags[i] : first_bags[i + 1]] - low
        yield (
            group,
            row,
            F.embedding_bag(cols_by_bag[low:high], W_dec, offsets, mode="sum", per_sample_weights=weights[low:high]),
        )


def sparse_matryoshka_losses(x, core_latents, rows, cols, values, by_col, W_dec, b_dec, group_ends: list[int]):
    """`SparseMatryoshkaLoss` for the Matryoshka groups ending at `group_ends` (in latents), from kept entries in
    (row, column) order: `(losses [G], reconstruction [B, d])`."""
    group = torch.bucketize(cols, torch.tensor(group_ends, device=cols.device), right=True)
    bag = group * len(x) + rows
    order = stable_order(group, len(group_ends))  # the entries bag by bag: (group, row) order, as they are by row
    return SparseMatryoshkaLoss.apply(x, core_latents, values, W_dec, b_dec, cols, bag, order, by_col, len(group_ends))
