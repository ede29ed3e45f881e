"""How much a model uses its core, counted each way the paper's Fig. 3 could have counted it. The paper does not say
how its `E[L0_core]` is counted; a dense core's latents are never masked, so "> 0" counts every core latent with a
positive pre-activation, while an implementation on dictionary_learning's `encode(use_threshold=True)` would count a
core latent only above the one inference threshold the masked latents use. Neither says how much of the
reconstruction the core carries, so that is measured too: the core's share of the reconstruction's energy, and the
held-out FVU lost when the core's latents are zeroed."""

from __future__ import annotations

import torch

from ..model.modeling_dmsae import DMSAEModel
from .held_out import fraction_of_variance_unexplained


@torch.no_grad()
def core_usage(model: DMSAEModel, activations: torch.Tensor) -> dict[str, float]:
    """On raw `activations` `[rows, d_in]`, in inference mode: `l0_core_positive` (core latents > 0 per row),
    `l0_core_above_threshold` (core latents above the inference threshold; None before it is estimated),
    `core_energy_share` (Σ‖core part of the reconstruction‖² / Σ‖reconstruction − b_dec‖²), `fvu` and
    `fvu_without_core` (the core's latents zeroed). Empty for a model without a core."""
    c = model.config.core_size
    if c == 0:
        return {}
    training = model.training
    model.eval()
    try:
        x = activations.to(model.W_dec.device, model.W_dec.dtype)
        latents = model.encode(x)
    finally:
        model.train(training)
    core_part = latents[:, :c] @ model.W_dec[:c]
    rest = latents[:, c:] @ model.W_dec[c:]
    x = x.float() / model.config.norm_factor
    threshold = float(model.threshold)
    values = {
        "l0_core_positive": (latents[:, :c] > 0).sum(1).float().mean(),
        "l0_core_above_threshold": (latents[:, :c] > threshold).sum(1).float().mean() if threshold >= 0 else None,
        "core_energy_share": core_part.float().pow(2).sum() / (core_part + rest).float().pow(2).sum(),
        "fvu": fraction_of_variance_unexplained(x, (core_part + rest + model.b_dec).float()),
        "fvu_without_core": fraction_of_variance_unexplained(x, (rest + model.b_dec).float()),
    }
    return {k: None if v is None else round(float(v), 6) for k, v in values.items()}
