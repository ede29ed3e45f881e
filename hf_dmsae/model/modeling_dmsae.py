"""The Distilled Matryoshka Sparse Autoencoder as a `PreTrainedModel` (docs/method.md §2).

Encoder `z = ReLU((x − b_dec) W_encᵀ + b_enc)`, decoder `x̂ = a W_dec + b_dec` with unit-norm rows. Encoder rows
`0 … frozen_rows-1` are a buffer, not a parameter: no optimiser, weight decay, gradient or mixed-precision cast can
move them. The loss sums one squared error per Matryoshka prefix (core plus the first i non-core groups), computed
from one encode by decoding group after group, plus a loss for dead latents (AuxK or ghost grads); there is no
core-only term.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dmsae import DMSAEConfig
from .kernels import SparseEncode, bag_bounds, sparse_matryoshka_losses
from .sparsity import (
    all_reduce_any,
    mask_batch_topk,
    mask_threshold,
    smallest_kept_activation,
    world_size,
)

CORE_THRESHOLD_INIT = 0.001
"""`jumprelu_core`: every core latent's threshold at initialisation (normalised units), as JumpReLU SAEs start."""

SPARSE_BLOCK_VALUES = 2**24
"""Pre-activations `encode_sparse` builds at once under the inference threshold: 64 MB in fp32 (256 rows at 65 536
latents), against 1 GB for a dense `[4096, 65 536]` batch of latents and as much again for each temporary."""


@dataclass
class DMSAEOutput(ModelOutput):
    """Output of [`DMSAEModel.forward`].

    Args:
        loss: `Σ_i prefix_losses[i] + aux_coef · aux_loss` (+ `core_sparsity_coef · core_sparsity` in the
            penalized modes), the training objective (Eq. 5); the sum is divided by `G²` with
            `prefix_loss_weighting="dictionary_learning"`.
        prefix_losses: `[G]` mean squared error (summed over `d_in`, normalised units) of the reconstruction from
            the core and the first `i` non-core groups; the last one uses the full dictionary.
        aux_loss: the dead latents' loss (AuxK or ghost grads, `dead_latent_loss`): how well they reconstruct the
            residual, relative to its variance.
        core_sparsity: the core's sparsity penalty before its weight `core_sparsity_coef`: the mean over rows of the
            core's summed activations (normalised units), or in `jumprelu_core` mode of its active latents (with a
            straight-through gradient for the thresholds).
        latents: `[B, dict_size]` masked activations (normalised units).
        reconstruction: `[B, d_in]` reconstruction by the full dictionary, in raw activation units.
        l0_core: mean number of active core latents per row.
        l0_noncore: mean number of active non-core latents per row.
    """

    loss: torch.FloatTensor | None = None
    prefix_losses: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    core_sparsity: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    l0_core: torch.FloatTensor | None = None
    l0_noncore: torch.FloatTensor | None = None


@dataclass
class SparseLatents:
    """Masked latents `[shape[0], shape[1]]` held as their nonzero entries in (row, column) order: what evaluation
    and the browser read, so that at 65 536 latents no dense `[B, n]` tensor outlives the encoder's block."""

    rows: torch.Tensor  # [E] long
    cols: torch.Tensor  # [E] long
    values: torch.Tensor  # [E] nonzero (> 0 but a `linear_core`'s), normalised units
    shape: tuple[int, int]

    def __post_init__(self):
        """Entries given in any order are put in (row, column) order, which `decode_sparse`'s bags read; entries
        outside `shape` and values that are not finite (an encoder that overflowed) are refused."""
        if not len(self.rows) == len(self.cols) == len(self.values):
            raise ValueError(
                f"SparseLatents needs as many rows, cols and values: got {len(self.rows)}, {len(self.cols)}, "
                f"{len(self.values)}"
            )
        if not len(self.rows):
            return
        batch, n = self.shape
        flat = self.rows * n + self.cols
        checks = [self.rows.amin(), self.rows.amax(), self.cols.amin(), self.cols.amax()]
        checks += [(flat[1:] < flat[:-1]).sum(), (~torch.isfinite(self.values)).sum()]
        low_row, high_row, low_col, high_col, unsorted, nonfinite = torch.stack(checks).tolist()  # one device sync
        if low_row < 0 or high_row >= batch:
            raise ValueError(
                f"SparseLatents rows must lie in [0, {batch}) (shape {self.shape}): got {low_row} … {high_row}"
            )
        if low_col < 0 or high_col >= n:
            raise ValueError(
                f"SparseLatents cols must lie in [0, {n}) (shape {self.shape}): got {low_col} … {high_col}"
            )
        if nonfinite:
            raise ValueError(
                f"{nonfinite} latent values are NaN or infinite: the encoder overflowed ({self.values.dtype}); are the "
                "activations in the range the SAE was trained on?"
            )
        if unsorted:
            order = flat.argsort(stable=True)
            self.rows, self.cols, self.values = self.rows[order], self.cols[order], self.values[order]

    @classmethod
    def from_dense(cls, latents: torch.Tensor) -> SparseLatents:
        rows, cols = latents.nonzero(as_tuple=True)
        return cls(rows, cols, latents[rows, cols], tuple(latents.shape))

    def to(self, device: torch.device | str) -> SparseLatents:
        return SparseLatents(self.rows.to(device), self.cols.to(device), self.values.to(device), self.shape)

    def to_dense(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.shape)
        dense[self.rows, self.cols] = self.values
        return dense

    def active_counts(self, core_size: int) -> torch.Tensor:
        """`[B, 2]` numbers of active core and non-core latents per row."""
        counts = torch.zeros(self.shape[0], 2, dtype=torch.long, device=self.rows.device)
        return counts.index_put_((self.rows, (self.cols >= core_size).long()), torch.ones_like(self.rows), True)


@dataclass
class _Pass:
    """What one forward computes, whichever kernels computed it."""

    prefix_losses: torch.Tensor  # [G] squared error of each Matryoshka prefix's reconstruction
    reconstruction: torch.Tensor  # [B, d_in] the full dictionary's, normalised units
    latents: torch.Tensor | None  # [B, n] masked latents (None when not asked for on the sparse path)
    fired: torch.Tensor  # [n] bool: latents active in the batch
    kept_values: torch.Tensor  # the activations BatchTopK kept (threshold EMA target)
    l0_core: torch.Tensor
    l0_noncore: torch.Tensor
    core_sparsity: torch.Tensor  # the core's sparsity penalty before its weight (`DMSAEOutput.core_sparsity`)


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's iteration for the point minimising the summed Euclidean distance to `points` `[N, d]`."""
    points = points.float()
    median = points.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if (updated - median).norm() <= tol * median.norm().clamp_min(1.0):
            return updated
        median = updated
    return median


class DMSAEModel(PreTrainedModel):
    """A Matryoshka BatchTopK SAE whose first `core_size` latents form a core with frozen encoder rows (a buffer, so
    optimisers and FSDP leave them bit-identical). `forward` trains: BatchTopK masks, the Matryoshka prefix losses
    (Eq. 5) and AuxK, in a `DMSAEOutput`; `encode` / `decode` infer with the learned threshold on masked latents."""

    config_class = DMSAEConfig
    base_model_prefix = "dmsae"
    main_input_name = "activations"

    def __init__(self, config: DMSAEConfig):
        super().__init__(config)
        n, d, f = config.dict_size, config.d_in, config.frozen_rows
        self.register_buffer("W_enc_frozen", torch.empty(f, d))
        self.W_enc_trainable = nn.Parameter(torch.empty(n - f, d))
        self.b_enc = nn.Parameter(torch.empty(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_dec = nn.Parameter(torch.empty(d))
        # Inference threshold of the masked latents; negative until training has estimated it.
        self.register_buffer("threshold", torch.tensor(-1.0))
        # Training tokens since each latent last fired; a latent is dead past `dead_tokens_threshold` (AuxK).
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        # `jumprelu_core`: each core latent's learned threshold, as its log (it stays positive).
        learned = config.core_mode.learned_thresholds
        self.core_log_threshold = nn.Parameter(torch.empty(config.core_size)) if learned else None
        # The dead latents AuxK reads, as set by `refresh_dead_latents` (None: found at every step, which waits for
        # the device; `DMSAETrainer` refreshes them at its logging steps instead).
        self.dead_latents: torch.Tensor | None = None
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if module is not self:
            return
        directions = torch.randn_like(self.W_dec, dtype=torch.float32)
        directions /= directions.norm(dim=1, keepdim=True)
        init.copy_(self.W_dec, directions)
        init.copy_(self.W_enc_trainable, directions[self.config.frozen_rows :])  # tied init
        init.zeros_(self.W_enc_frozen)  # the core's rows arrive through `from_core`
        init.zeros_(self.b_enc)
        init.zeros_(self.b_dec)
        init.constant_(self.threshold, -1.0)
        init.zeros_(self.tokens_since_fired)
        if self.core_log_threshold is not None:
            init.constant_(self.core_log_threshold, math.log(CORE_THRESHOLD_INIT))

    @classmethod
    def from_core(cls, config: DMSAEConfig, core_rows: torch.Tensor) -> DMSAEModel:
        """A freshly initialised model whose frozen encoder rows are `core_rows` (copied bit for bit), in the order of
        the config's `core_ids`; everything else (decoder, biases, non-core encoder) is new."""
        core_rows = torch.as_tensor(core_rows)
        if core_rows.ndim != 2 or core_rows.shape[1] != config.d_in:
            raise ValueError(f"core_rows must have shape [core_size, d_in={config.d_in}], got {tuple(core_rows.shape)}")
        if core_rows.shape[0] != config.core_size or config.frozen_rows != config.core_size:
            raise ValueError(
                f"config must describe a fully frozen core of {core_rows.shape[0]} rows "
                f"(got core_size={config.core_size}, frozen_rows={config.frozen_rows})"
            )
        model = cls(copy.deepcopy(config))
        with torch.no_grad():
            model.W_enc_frozen.copy_(core_rows)
        return model

    def get_input_embeddings(self) -> None:
        """An SAE has no token embeddings (FSDP and the Trainer ask)."""
        return None

    @property
    def W_enc(self) -> torch.Tensor:
        """`[dict_size, d_in]` encoder: the frozen rows, then the trainable ones."""
        return torch.cat([self.W_enc_frozen, self.W_enc_trainable])

    def _checked(self, activations: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """Check the input is usable, flatten leading dimensions to `[B, d_in]`, cast to the model's dtype.
        `check_values=False` leaves out the NaN/inf check, which waits for the device (`DMSAETrainer` checks training
        inputs at its logging steps instead)."""
        d = self.config.d_in
        if not torch.is_tensor(activations) or not activations.is_floating_point():
            raise ValueError(f"activations must be a floating-point tensor of shape [..., {d}]")
        if activations.ndim < 1 or activations.shape[-1] != d:
            raise ValueError(f"activations must have last dimension d_in={d}, got shape {tuple(activations.shape)}")
        if activations.numel() == 0:
            raise ValueError("activations are empty: at least one row is needed")
        if check_values and not torch.isfinite(activations).all():
            raise ValueError("activations contain NaN or inf values")
        return activations.reshape(-1, d).to(self.W_dec.dtype)

    def _relu_preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """`ReLU((x − b_dec) W_encᵀ + b_enc)` for normalised `x` (a `linear_core`'s columns without the ReLU),
        without materialising the joined `W_enc`; the bias and the ReLU act in place on the joined output (one
        `[B, n]` tensor fewer at a time; autograd-safe: neither `cat` nor the addition saves what they overwrite)."""
        centred = x - self.b_dec
        frozen = F.linear(centred, self.W_enc_frozen)
        trainable = F.linear(centred, self.W_enc_trainable)
        preactivations = torch.cat([frozen, trainable], dim=1).add_(self.encoder_bias)
        if not self.config.core_linear:
            return preactivations.relu_()
        c = self.config.core_size
        return torch.cat([preactivations[:, :c], preactivations[:, c:].relu()], dim=1)

    @property
    def encoder_bias(self) -> torch.Tensor:
        """`b_enc` as the encoder adds it: with `train_core_bias=False` its core entries are detached, so no gradient
        (hence no Adam step) ever reaches them."""
        c = self.config.core_size
        if self.config.train_core_bias or c == 0:
            return self.b_enc
        return torch.cat([self.b_enc[:c].detach(), self.b_enc[c:]])

    @property
    def masks_by_batch_topk(self) -> bool:
        """The default mask: BatchTopK while training or before a threshold exists, the threshold otherwise."""
        return self.training or bool(self.threshold < 0)

    def _mask(self, z: torch.Tensor, batch_topk: bool | None = None) -> torch.Tensor:
        """BatchTopK while training (or before a threshold exists), the threshold at inference; `batch_topk`
        chooses explicitly."""
        start = self.config.first_masked_latent
        if batch_topk is None:
            batch_topk = self.masks_by_batch_topk
        if batch_topk:
            latents = mask_batch_topk(z, start, self.config.topk_per_row)
        else:
            latents = mask_threshold(z, start, self.threshold)
        if not self.config.core_mode.learned_thresholds:  # the core's latents are its pre-activations
            return latents
        return torch.cat([self.core_activations(latents[:, :start]), latents[:, start:]], dim=1)

    def core_activations(self, preactivations: torch.Tensor) -> torch.Tensor:
        """An unmasked core's latents `[B, c]` from its pre-activations, by its mode's rule (`CoreMode`)."""
        mode = self.config.core_mode
        return mode.activations(preactivations, self.core_log_threshold, self.config.jumprelu_bandwidth)

    def _core_sparsity(self, preactivations: torch.Tensor, core_l1: torch.Tensor) -> torch.Tensor:
        """The core's sparsity penalty before its weight, by its mode's rule (`CoreMode`), from the core's
        pre-activations `[B, c]` and `core_l1`, its summed activations per row."""
        mode = self.config.core_mode
        return mode.sparsity(preactivations, core_l1, self.core_log_threshold, self.config.jumprelu_bandwidth)

    def encode(self, activations: torch.Tensor, batch_topk: bool | None = None) -> torch.Tensor:
        """Raw activations `[..., d_in]` → masked latents `[..., dict_size]`. The mask is BatchTopK over the rows
        given (training masks, as attribution needs) if `batch_topk`, the inference threshold if not, and by
        default BatchTopK in training mode only."""
        x = self._checked(activations) / self.config.norm_factor
        latents = self._mask(self._relu_preactivations(x), batch_topk)
        return latents.reshape(*activations.shape[:-1], self.config.dict_size)

    @torch.no_grad()
    def encode_sparse(self, activations: torch.Tensor, batch_topk: bool | None = None) -> SparseLatents:
        """`encode`'s latents as their nonzero entries. With the inference threshold, rows are encoded
        `SPARSE_BLOCK_VALUES // dict_size` at a time, so the dense pre-activations of one block are the peak; BatchTopK
        (`batch_topk`, as `encode` chooses it) masks over the whole batch, so it encodes the batch at once."""
        x = self._checked(activations) / self.config.norm_factor
        if batch_topk is None:
            batch_topk = self.masks_by_batch_topk
        n = self.config.dict_size
        blocks = [x] if batch_topk else x.split(max(1, SPARSE_BLOCK_VALUES // n))
        rows, cols, values, first = [], [], [], 0
        for block in blocks:
            entries = SparseLatents.from_dense(self._mask(self._relu_preactivations(block), batch_topk))
            rows.append(entries.rows + first)
            cols.append(entries.cols)
            values.append(entries.values)
            first += len(block)
        return SparseLatents(torch.cat(rows), torch.cat(cols), torch.cat(values), (len(x), n))

    def decode_sparse(self, latents: SparseLatents) -> torch.Tensor:
        """`decode` of sparse latents: each row's active decoder rows summed (`embedding_bag`), in raw units."""
        if latents.shape[1] != self.config.dict_size:
            raise ValueError(f"latents have {latents.shape[1]} columns, the model dict_size={self.config.dict_size}")
        sums = F.embedding_bag(
            latents.cols,
            self.W_dec,
            bag_bounds(latents.rows, latents.shape[0])[:-1],
            mode="sum",
            per_sample_weights=latents.values.to(self.W_dec.dtype),
        )
        return (sums + self.b_dec) * self.config.norm_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[..., dict_size]` → reconstruction `[..., d_in]` in raw activation units (in the model's dtype,
        whatever the latents' dtype)."""
        if latents.shape[-1] != self.config.dict_size:
            raise ValueError(
                f"latents must have last dimension dict_size={self.config.dict_size}, got {tuple(latents.shape)}"
            )
        return (latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) * self.config.norm_factor

    def forward(self, activations: torch.Tensor, return_latents: bool = True) -> DMSAEOutput:
        """Loss and statistics of a batch. BatchTopK masks run on the sparse kernels (`config.kernels`) unless the
        threshold masks (inference); `return_latents=False` skips building the dense `[B, n]` latents."""
        x = self._checked(activations, check_values=not self.training) / self.config.norm_factor
        batch_topk = self.masks_by_batch_topk
        if self.config.kernels == "sparse" and batch_topk:
            step = self._sparse_pass(x, return_latents)
        else:
            step = self._dense_pass(x)
        if self.training:
            self._update_statistics(step.fired, step.kept_values, len(x))
        prefix_losses = step.prefix_losses
        aux_loss = self._aux_loss(x, step.reconstruction)
        loss = self._prefix_weight(len(prefix_losses)) * prefix_losses.sum() + self.config.aux_coef * aux_loss
        if self.config.core_penalty:
            loss = loss + self.config.core_penalty * step.core_sparsity
        return DMSAEOutput(
            loss=loss,
            prefix_losses=prefix_losses,
            aux_loss=aux_loss,
            core_sparsity=step.core_sparsity,
            latents=step.latents if return_latents else None,
            reconstruction=step.reconstruction * self.config.norm_factor,
            l0_core=step.l0_core,
            l0_noncore=step.l0_noncore,
        )

    def _prefix_weight(self, prefixes: int) -> float:
        """The weight of each prefix loss: 1 (Eq. 5) or dictionary_learning's `1/G²`."""
        return 1.0 if self.config.prefix_loss_weighting == "sum" else 1.0 / prefixes**2

    def _dense_pass(self, x: torch.Tensor) -> _Pass:
        """The reference: dense latents `[B, n]`, masked, decoded group after group."""
        c, start = self.config.core_size, self.config.first_masked_latent
        z = self._relu_preactivations(x)
        latents = self._mask(z)
        core_sparsity = self._core_sparsity(z[:, :c], latents[:, :c].float().abs().sum(1).mean())
        reconstructions, reconstruction, low = [], self.b_dec.expand_as(x), 0
        for end in [c] + self.config.prefix_ends:
            if end > low:
                reconstruction = reconstruction + latents[:, low:end] @ self.W_dec[low:end]
            if end > c:
                reconstructions.append(reconstruction)
            low = end
        active = (latents != 0).float()
        return _Pass(
            prefix_losses=torch.stack([squared_error(x, r) for r in reconstructions]),
            reconstruction=reconstruction,
            latents=latents,
            fired=(latents != 0).any(0),
            kept_values=latents[:, start:],
            l0_core=active[:, :c].sum(1).mean(),
            l0_noncore=active[:, c:].sum(1).mean(),
            core_sparsity=core_sparsity,
        )

    def _sparse_pass(self, x: torch.Tensor, return_latents: bool) -> _Pass:
        """The same computation on the kept entries only (`hf_dmsae.kernels`)."""
        c, start, n, batch = self.config.core_size, self.config.first_masked_latent, self.config.dict_size, len(x)
        core, rows, cols, values, by_col = SparseEncode.apply(
            x,
            self.b_dec,
            self.W_enc_frozen,
            self.W_enc_trainable,
            self.encoder_bias,
            start,
            self.config.topk_per_row * batch,
            not self.config.core_linear,
        )
        preactivations, core = core, self.core_activations(core)
        # The core's, in any mode; masked by a product, as boolean indexing would wait for the device.
        core_l1 = (core.float().abs().sum() + (values.float() * (cols < c)).sum()) / batch
        core_sparsity = self._core_sparsity(preactivations, core_l1)
        prefix_losses, reconstruction = sparse_matryoshka_losses(
            x, core, rows, cols, values, by_col, self.W_dec, self.b_dec, self.config.prefix_ends
        )
        active, core_active = values > 0, core != 0  # counted by count_nonzero: a bool sum copies to int64 first
        fired = torch.zeros(n, dtype=torch.int32, device=x.device).index_add_(0, cols, active.int()) > 0
        fired[:start] |= core.abs().sum(0) > 0  # as (core != 0).any(0), which reduces ~20x slower on a CPU
        core_entries = torch.count_nonzero(active & (cols < c))
        latents = None
        if return_latents:
            kept = torch.zeros(batch, n - start, device=x.device, dtype=values.dtype)
            latents = torch.cat([core, kept.index_put((rows, cols - start), values)], dim=1)
        return _Pass(
            prefix_losses=prefix_losses,
            reconstruction=reconstruction,
            latents=latents,
            fired=fired,
            kept_values=values,
            l0_core=(torch.count_nonzero(core_active[:, :c]) + core_entries) / batch,
            l0_noncore=(torch.count_nonzero(active) - core_entries) / batch,
            core_sparsity=core_sparsity,
        )

    def _aux_loss(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """The dead latents' loss: their reconstruction of the detached residual `x − x̂` by the config's
        `dead_latent_loss` rule, its squared error divided by the residual's variance. Zero when none is dead."""
        dead = self.dead_latents if self.dead_latents is not None else self._find_dead_latents()
        if len(dead) == 0:
            return x.new_zeros((), dtype=torch.float32)
        residual = (x - reconstruction).detach().float()
        preactivations = F.linear(x - self.b_dec, self.W_enc[dead], self.encoder_bias[dead])  # before any ReLU
        reconstruct = DEAD_LATENT_RECONSTRUCTIONS[self.config.dead_latent_loss]
        aux_error = squared_error(residual, reconstruct(preactivations, self.W_dec[dead], residual, self.config))
        residual_variance = squared_error(residual, residual.mean(0, keepdim=True))
        return (aux_error / residual_variance).nan_to_num(0.0)

    def _find_dead_latents(self) -> torch.Tensor:
        return torch.nonzero(self.tokens_since_fired >= self.config.dead_tokens_threshold).squeeze(1)

    @torch.no_grad()
    def refresh_dead_latents(self) -> None:
        """Fix the dead latents AuxK reads until the next refresh (finding them waits for the device, so a trainer
        does it where it waits anyway: at logging steps)."""
        self.dead_latents = self._find_dead_latents()

    @torch.no_grad()
    def _update_statistics(self, fired: torch.Tensor, kept_values: torch.Tensor, batch: int) -> None:
        """Dead-latent counters and the inference threshold's EMA, agreed across processes."""
        fired = all_reduce_any(fired)
        self.tokens_since_fired += batch * world_size()
        self.tokens_since_fired.masked_fill_(fired, 0)

        smallest = smallest_kept_activation(kept_values)
        beta = self.config.threshold_beta
        updated = torch.where(self.threshold < 0, smallest, beta * self.threshold + (1 - beta) * smallest)
        self.threshold.copy_(torch.where(torch.isnan(smallest), self.threshold, updated))

    @torch.no_grad()
    def calibrate_threshold(self, activations: torch.Tensor, batch_size: int = 1024) -> float:
        """Set the inference threshold to the smallest activation BatchTopK would keep over all of `activations`
        (raw, `[N, d_in]`), so that inference keeps `topk_per_row` masked latents per row on average on them. The
        training EMA of that value lags while the activations still shrink, which on short runs leaves the
        inference L0 well below its target. Exact: the kept values are the top `N·topk_per_row` of all chunks'."""
        x = self._checked(activations)
        start, kept = self.config.first_masked_latent, len(x) * self.config.topk_per_row
        top = torch.empty(0, device=self.W_dec.device)
        for chunk in x.split(batch_size):
            z = self._relu_preactivations(chunk / self.config.norm_factor)[:, start:].flatten().float()
            top = torch.cat([top, z.topk(min(len(z), kept)).values])
            top = top.topk(min(len(top), kept)).values
        positive = top[top > 0]
        if len(positive):
            self.threshold.fill_(float(positive[-1]))
        return float(self.threshold)

    @torch.no_grad()
    def init_decoder_bias(self, activations: torch.Tensor) -> None:
        """Set `b_dec` to the geometric median of a first batch of raw activations
        (docs/method.md §2, initialisation)."""
        x = self._checked(activations) / self.config.norm_factor
        self.b_dec.copy_(geometric_median(x))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row, so a step keeps rows near unit norm.
        Call between `backward` and the optimiser step."""
        W, grad = self.W_dec, self.W_dec.grad
        if grad is None:
            return
        # (g · u) / ‖W‖ for u = W / ‖W‖; the norm reduces without a [n, d] temporary, as vecdot(W, W) would not
        along = torch.linalg.vecdot(grad, W) / torch.linalg.vector_norm(W, dim=1).square()
        grad.addcmul_(W, along.unsqueeze(1), value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise decoder rows to unit norm. Call after each optimiser step."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but weights that do not match the model (a missing, renamed or
        reshaped tensor, which transformers would re-initialise with a warning) are an error."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except Exception as error:  # safetensors' own errors name no file (e.g. a header announcing 100 GB)
            if type(error).__name__ != "SafetensorError":
                raise
            raise ValueError(
                f"{pretrained_model_name_or_path}: its model.safetensors is unreadable ({error})"
            ) from error
        problems = {
            k: sorted(map(str, v))
            for k, v in info.items()
            if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path} does not hold this model's weights: {problems}")
        nonfinite = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if nonfinite:  # one NaN encoder row would win every BatchTopK slot and make every metric NaN
            raise ValueError(f"{pretrained_model_name_or_path}: the weights {nonfinite} hold NaN or infinite values")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, also writing the inference threshold into `config.json`."""
        threshold = float(self.threshold)
        self.config.threshold = threshold if threshold >= 0 else None
        return super().save_pretrained(save_directory, *args, **kwargs)


def auxk_reconstruction(
    preactivations: torch.Tensor, decoder_rows: torch.Tensor, residual: torch.Tensor, config: DMSAEConfig
) -> torch.Tensor:
    """AuxK (Gao et al. 2024, as dictionary_learning): each row's top `aux_k` dead latents at their ReLU
    pre-activations. A latent whose pre-activation is below 0 on every row gets no gradient from it."""
    values, index = preactivations.relu().topk(min(config.aux_k, preactivations.shape[1]), dim=1, sorted=False)
    return torch.zeros_like(preactivations).scatter(1, index, values) @ decoder_rows


def ghost_reconstruction(
    preactivations: torch.Tensor, decoder_rows: torch.Tensor, residual: torch.Tensor, config: DMSAEConfig
) -> torch.Tensor:
    """Ghost grads (Anthropic, "Circuits Updates", January 2024): every dead latent at `exp` of its
    pre-activation, the row's sum rescaled (without gradient) to half the residual's norm. `exp` has a gradient at
    any pre-activation, so latents that never reach 0 are pulled towards the residual too. Each row's largest
    pre-activation is subtracted first: the rescaling cancels it, and `exp` stays finite."""
    shifted = preactivations.float() - preactivations.detach().float().amax(1, keepdim=True)
    ghost = shifted.exp() @ decoder_rows.float()
    scale = residual.norm(dim=1, keepdim=True) / (2 * ghost.norm(dim=1, keepdim=True)).clamp_min(1e-12)
    return ghost * scale.detach()


DEAD_LATENT_RECONSTRUCTIONS = {"auxk": auxk_reconstruction, "ghost_grads": ghost_reconstruction}
"""How dead latents reconstruct the residual, by `DMSAEConfig.dead_latent_loss`."""


def squared_error(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """`‖x − x̂‖²` summed over features, averaged over rows `[B, d]`, in fp32 (`reconstruction` may broadcast). One
    fused kernel each way (`mse_loss`), where the plain expression takes four, each through a `[B, d]` temporary."""
    x = x.float()
    return F.mse_loss(reconstruction.float().expand_as(x), x, reduction="sum") / len(x)


__all__ = ["DMSAEModel", "DMSAEOutput", "geometric_median"]
