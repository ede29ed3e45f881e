"""How good a trained SAE is on held-out data: reconstruction, sparsity and the LM's loss with it spliced in.

The metrics are Hugging Face `evaluate` modules shipped in `hf_dmsae/metrics/` (each with its metric card):
`fvu`, `l0`, `dead_latents` and `ce_loss_recovered`, loadable with `evaluate.load(<folder>)` or `load_metric(name)`.
Each takes one example per batch holding that batch's sums (never its rows), so an evaluation's memory does not grow
with the tokens evaluated. This module computes those sums and feeds them:

- `activation_metrics`: FVU, L0 (core, non-core, global) and the fraction of latents that never fire, over held-out
  activations, with the model in inference mode (its learned threshold).
- `ce_loss_recovered`: the LM's next-token loss clean, with the SAE's reconstruction spliced in at the hook, and with
  the activation zero-ablated there; recovered = (L_zero − L_sae) / (L_zero − L_clean). Positions the SAE never
  trains on (special tokens, attention-sink outliers) stay clean in both interventions.
- `SAEEvalMetrics`: the Trainer's `compute_metrics` (batch by batch), so `eval_dataset` gives `eval_fvu` and the
  `eval_l0*` in the logs every `eval_steps`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..data.activations import TrainingPositions
from ..data.language_model import LayerActivations
from ..model.modeling_dmsae import DMSAEModel, SparseLatents
from ..utils.stages import stage

METRICS_DIR = Path(__file__).parents[1] / "metrics"


def load_metric(name: str):
    """One of the package's `evaluate` modules (`fvu`, `l0`, `dead_latents`, `ce_loss_recovered`), kept in memory."""
    import evaluate

    if not (METRICS_DIR / name / f"{name}.py").is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise ValueError(f"unknown metric {name!r}: the package ships {known}")
    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def fvu_sums(x: torch.Tensor, reconstruction: torch.Tensor) -> dict:
    """The `fvu` module's example for one batch: its squared error, per-dimension sum, sum of squares and rows."""
    x = x.float()  # float32 temporaries, float64 sums: a batch costs a few copies of itself, never a float64 one
    squared_error = (x - reconstruction.float()).pow_(2).sum(dtype=torch.float64)
    return {
        "squared_error": float(squared_error),
        "sum": x.sum(0, dtype=torch.float64).tolist(),
        "sum_of_squares": float(x.pow(2).sum(dtype=torch.float64)),
        "rows": len(x),
    }


def fraction_of_variance_unexplained(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """`Σ‖x − x̂‖² / Σ‖x − x̄‖²` over a batch."""
    return (x - reconstruction).pow(2).sum() / (x - x.mean(0, keepdim=True)).pow(2).sum()


def active_counts(latents: torch.Tensor, core_size: int) -> torch.Tensor:
    """`[B, 2]` numbers of active core and non-core latents per row (what the Trainer gathers for the `l0` metric)."""
    active = latents != 0  # a `linear_core`'s latents are signed
    return torch.stack([active[:, :core_size].sum(1), active[:, core_size:].sum(1)], dim=1)


def l0_sums(counts: torch.Tensor) -> dict:
    """The `l0` module's example for one batch of `active_counts` rows."""
    totals = counts.long().sum(0).tolist()
    return {"core_active": totals[0], "noncore_active": totals[1], "rows": len(counts)}


@torch.no_grad()
def in_inference_mode(
    sae: DMSAEModel, activations: Iterable[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, SparseLatents]]:
    """Each batch of raw activations (moved to the model's device) with its sparse latents in inference mode (the
    learned threshold); the model's mode is restored when the batches end or the loop is left."""
    was_training = sae.training
    sae.eval()
    try:
        for x in activations:
            x = x.to(sae.device)
            yield x, sae.encode_sparse(x)
    finally:
        sae.train(was_training)


@torch.no_grad()
def activation_metrics(sae: DMSAEModel, activations: Iterable[torch.Tensor]) -> dict[str, float]:
    """FVU, L0s and dead fraction of `sae` (inference mode) over batches of raw activations `[N, d_in]`."""
    fvu, l0, dead = load_metric("fvu"), load_metric("l0"), load_metric("dead_latents")
    fired = torch.zeros(sae.config.dict_size, dtype=torch.bool, device=sae.device)
    with stage("evaluation") as timed:
        for x, latents in in_inference_mode(sae, activations):
            fvu.add(**fvu_sums(x, sae.decode_sparse(latents)))
            l0.add(**l0_sums(latents.active_counts(sae.config.core_size)))
            fired[latents.cols] = True
            timed.tokens += len(x)
    dead.add(fired_latents=fired.nonzero().squeeze(1).tolist())
    return {**fvu.compute(), **l0.compute(), **dead.compute(dict_size=sae.config.dict_size)}


class SAEEvalMetrics:
    """`compute_metrics` for `DMSAETrainer` with `batch_eval_metrics`: the `fvu` and `l0` modules fed batch by
    batch from the (gathered) reconstructions, per-row active counts and activations."""

    def __init__(self):
        self.fvu, self.l0 = load_metric("fvu"), load_metric("l0")

    def __call__(self, prediction, compute_result: bool) -> dict[str, float] | None:
        reconstruction, counts = prediction.predictions
        self.fvu.add(**fvu_sums(prediction.label_ids, reconstruction))
        self.l0.add(**l0_sums(counts))
        if compute_result:
            return {**self.fvu.compute(), **self.l0.compute()}
        return None


@torch.no_grad()
def ce_loss_recovered(
    sae: DMSAEModel, lm: torch.nn.Module, batches: Iterable[torch.Tensor], positions: TrainingPositions
) -> dict[str, float]:
    """Mean next-token loss clean, with the SAE spliced in, and zero-ablated, and the share of it recovered."""
    was_training = sae.training
    sae.eval()
    layer = LayerActivations(lm, sae.config.hook_layer, sae.config.hook_name)
    metric = load_metric("ce_loss_recovered")
    for input_ids in batches:
        input_ids = input_ids.to(lm.device)
        keep = positions.mask(input_ids, layer(input_ids))

        def spliced(hidden, keep=keep):
            out = hidden.clone()
            out[keep] = sae.decode_sparse(sae.encode_sparse(hidden[keep])).to(hidden.dtype)
            return out

        def zero_ablated(hidden, keep=keep):
            return hidden.masked_fill(keep.unsqueeze(-1), 0.0)

        interventions = {"clean": lambda hidden: hidden, "spliced": spliced, "zero_ablated": zero_ablated}
        losses = {}
        for name, transform in interventions.items():
            losses[f"loss_{name}"] = float(layer.patched_loss(input_ids, transform))
        metric.add(**losses, tokens=input_ids[:, 1:].numel())
    sae.train(was_training)
    return metric.compute()
