"""How good a trained SAE is on held-out data: reconstruction, sparsity and the LM's loss with it spliced in.

- `activation_metrics`: FVU, L0 (core, non-core, global) and the fraction of latents that never fire, over held-out
  activations, with the model in inference mode (its learned threshold).
- `ce_loss_recovered`: the LM's next-token loss clean, with the SAE's reconstruction spliced in at the hook, and with
  the activation zero-ablated there; recovered = (L_zero − L_sae) / (L_zero − L_clean). Positions the SAE never
  trains on (special tokens, attention-sink outliers) stay clean in both interventions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .activations import LayerActivations, TrainingPositions
from .modeling_dmsae import DMSAEModel


@torch.no_grad()
def activation_metrics(sae: DMSAEModel, activations: Iterable[torch.Tensor]) -> dict[str, float]:
    """FVU, L0s and dead fraction of `sae` (inference mode) over batches of raw activations `[N, d_in]`."""
    was_training = sae.training
    sae.eval()
    c, n = sae.config.core_size, sae.config.dict_size
    error = total = rows = 0.0
    active_core = active_noncore = 0.0
    fired = torch.zeros(n, dtype=torch.bool)
    sums = torch.zeros(sae.config.d_in, dtype=torch.float64)
    squares = 0.0
    for x in activations:
        x = x.to(sae.device)
        latents = sae.encode(x)
        reconstruction = sae.decode(latents).double()
        x = x.double()
        error += float((x - reconstruction).pow(2).sum())
        sums += x.sum(0).cpu()
        squares += float(x.pow(2).sum())
        rows += len(x)
        active = latents > 0
        active_core += float(active[:, :c].sum())
        active_noncore += float(active[:, c:].sum())
        fired |= active.any(0).cpu()
    sae.train(was_training)
    total = squares - float(sums.pow(2).sum()) / rows  # Σ‖x − x̄‖²
    return {
        "fvu": error / total,
        "l0_core": active_core / rows,
        "l0_noncore": active_noncore / rows,
        "l0": (active_core + active_noncore) / rows,
        "dead_fraction": 1.0 - float(fired.float().mean()),
    }


@torch.no_grad()
def ce_loss_recovered(
    sae: DMSAEModel, lm: torch.nn.Module, batches: Iterable[torch.Tensor], positions: TrainingPositions
) -> dict[str, float]:
    """Mean next-token loss clean, with the SAE spliced in, and zero-ablated, and the share of it recovered."""
    was_training = sae.training
    sae.eval()
    layer = LayerActivations(lm, sae.config.hook_layer, sae.config.hook_name)
    sums = {"clean": 0.0, "spliced": 0.0, "zero_ablated": 0.0}
    count = 0
    for input_ids in batches:
        input_ids = input_ids.to(lm.device)
        keep = positions.mask(input_ids, layer(input_ids))

        def spliced(hidden, keep=keep):
            out = hidden.clone()
            out[keep] = sae.decode(sae.encode(hidden[keep])).to(hidden.dtype)
            return out

        def zero_ablated(hidden, keep=keep):
            return hidden.masked_fill(keep.unsqueeze(-1), 0.0)

        interventions = {"clean": lambda hidden: hidden, "spliced": spliced, "zero_ablated": zero_ablated}
        for name, transform in interventions.items():
            logits = layer.patched_logits(input_ids, transform)
            sums[name] += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(),
                                                reduction="sum"))  # fmt: skip
        count += input_ids[:, 1:].numel()
    sae.train(was_training)
    losses = {f"ce_loss_{name}": value / count for name, value in sums.items()}
    gap = losses["ce_loss_zero_ablated"] - losses["ce_loss_clean"]
    losses["ce_loss_recovered"] = (losses["ce_loss_zero_ablated"] - losses["ce_loss_spliced"]) / gap
    return losses
