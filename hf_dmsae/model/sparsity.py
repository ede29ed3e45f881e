"""The sparsity modes of the core (`CoreMode`, one per `DMSAEConfig.sparsity`), BatchTopK masks and the inference
threshold that replaces them (docs/method.md §2).

The masked region of the latents starts at `start`: the first non-core latent when the core is unmasked (its latents
pass through), 0 in sparse-core mode (one global BatchTopK over every latent).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def batch_topk(z: torch.Tensor, k_total: int) -> torch.Tensor:
    """Keep the `k_total` largest entries of `z` across the whole batch and zero the rest (exactly `k_total` kept,
    ties broken by `topk`). Gradients flow to the kept entries only."""
    k_total = min(k_total, z.numel())
    values, flat_index = z.flatten().topk(k_total, sorted=False)
    return torch.zeros_like(z).flatten().scatter(0, flat_index, values).view_as(z)


def mask_batch_topk(z: torch.Tensor, start: int, k_per_row: int) -> torch.Tensor:
    """Training mask: latents before `start` unmasked, BatchTopK with `k_per_row · B` over the rest."""
    masked = batch_topk(z[:, start:], k_per_row * z.shape[0])
    return torch.cat([z[:, :start], masked], dim=1) if start else masked


def mask_threshold(z: torch.Tensor, start: int, threshold: torch.Tensor) -> torch.Tensor:
    """Inference mask: latents before `start` unmasked, the rest kept only above `threshold`."""
    tail = z[:, start:]
    masked = tail * (tail > threshold)
    return torch.cat([z[:, :start], masked], dim=1) if start else masked


def smallest_kept_activation(kept: torch.Tensor) -> torch.Tensor:
    """The smallest positive activation among those BatchTopK kept (the threshold's EMA target); NaN where nothing
    fired. Averaged over processes, since each process masks its own batch."""
    kept = kept.detach().float()
    smallest = torch.where(kept > 0, kept, torch.inf).min() if kept.numel() else kept.new_tensor(torch.inf)
    smallest = torch.where(torch.isinf(smallest), torch.nan, smallest)
    return all_reduce_mean(smallest)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a scalar, ignoring NaN contributions (a no-op outside `torch.distributed`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    packed = torch.stack([torch.nan_to_num(value, nan=0.0), (~torch.isnan(value)).float()])
    dist.all_reduce(packed)
    return packed[0] / packed[1]  # 0 / 0 = NaN where no process saw a firing latent


def all_reduce_any(flags: torch.Tensor) -> torch.Tensor:
    """Logical OR over processes of a boolean tensor (a no-op outside `torch.distributed`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    as_int = flags.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.bool()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class JumpReLU(torch.autograd.Function):
    """`z · 1[z > θ]` per column (`θ` `[columns]`), with JumpReLU's straight-through gradient for `θ` (Rajamanoharan
    et al. 2024): `∂/∂θ ≈ −θ/ε · K((z − θ)/ε)`, `K` the unit rectangle and `ε` the bandwidth."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, threshold = ctx.saved_tensors
        window = ((z - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype) / ctx.bandwidth
        return grad * (z > threshold), -(threshold * window * grad).sum(0), None


class Step(torch.autograd.Function):
    """`1[z > θ]` per column, with the pseudo-derivative `−1/ε · K((z − θ)/ε)` for `θ` and none for `z`: the
    L0 penalty of a JumpReLU."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, threshold = ctx.saved_tensors
        window = ((z - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype) / ctx.bandwidth
        return None, -(window * grad).sum(0), None


class CoreMode:
    """How a sparsity mode forms the core's latents from their pre-activations and what their sparsity costs: the
    model reads its mode's rules here instead of branching on the mode's name. `unmasked`: the core is outside
    BatchTopK and the inference threshold; `linear`: its latents are signed read-outs, not ReLU's; `penalized`: the
    loss weighs `sparsity` by `core_sparsity_coef`; `learned_thresholds`: each core latent has a learned threshold
    (the model's `core_log_threshold`)."""

    learned_thresholds = False

    def __init__(self, *, unmasked: bool = True, linear: bool = False, penalized: bool = False):
        self.unmasked, self.linear, self.penalized = unmasked, linear, penalized

    def activations(self, preactivations: torch.Tensor, log_threshold, bandwidth: float) -> torch.Tensor:
        """An unmasked core's latents `[B, c]` from its pre-activations: themselves."""
        return preactivations

    def sparsity(self, preactivations: torch.Tensor, core_l1: torch.Tensor, log_threshold, bandwidth: float):
        """The core's sparsity penalty before its weight: `core_l1`, its summed activations per row."""
        return core_l1


class JumpReLUCore(CoreMode):
    """A learned threshold per core latent (JumpReLU) and an L0 penalty, each with its straight-through gradient."""

    learned_thresholds = True

    def activations(self, preactivations: torch.Tensor, log_threshold, bandwidth: float) -> torch.Tensor:
        return JumpReLU.apply(preactivations, log_threshold.exp(), bandwidth)

    def sparsity(self, preactivations: torch.Tensor, core_l1: torch.Tensor, log_threshold, bandwidth: float):
        """Its active latents per row: a step at each threshold."""
        return Step.apply(preactivations, log_threshold.exp(), bandwidth).sum(1).mean()


CORE_MODES = {
    "dense_core": CoreMode(),
    "sparse_core": CoreMode(unmasked=False),
    "penalized_core": CoreMode(penalized=True),
    "jumprelu_core": JumpReLUCore(penalized=True),
    "linear_core": CoreMode(linear=True),
}
"""Every `DMSAEConfig.sparsity` value's rules."""
