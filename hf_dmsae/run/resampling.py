"""Dead-latent resampling (Bricken et al. 2023; dictionary_learning's `resample_steps`), for `DMSAETrainer`.

AuxK pulls dead latents back only while some row gives them a positive pre-activation; on the embedded default most
of a dense-core DMSAE's dead latents have a negative pre-activation on every row (`reports/convergence`), so its
gradient never reaches them. Resampling gives each a new start instead: its decoder row points along the residual
`x − x̂` of a batch row drawn with probability proportional to that row's squared error, its encoder row along the
same direction at the alive encoder rows' mean norm, its bias 0, its Adam moments 0 and its dead counter 0.
The core's latents are never resampled (their rows are the core), and no latent is once the learning rate decays (a
latent started then cannot train).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..model.modeling_dmsae import DMSAEModel

logger = logging.getLogger(__name__)

ENCODER_SCALE = 1.0
"""A resampled encoder row's norm, relative to the alive encoder rows' mean. Bricken et al.'s 0.2 suits an L1 SAE, where
any positive pre-activation fires; under BatchTopK a latent must win a slot, and at 0.2 none does: in the tests' tiny
model every resampled latent was dead again by the next resampling, at 1.0 (tied, as at initialisation) none was."""


@torch.no_grad()
def resample_dead_latents(
    sae: DMSAEModel, activations: torch.Tensor, optimizer: torch.optim.Optimizer | None, generator: torch.Generator
) -> torch.Tensor:
    """Restart the dead non-core latents of `sae` (at most one per row of `activations`, raw `[B, d_in]`) and their
    Adam state; returns their indices. Every process must call it with its own batch: the new rows are drawn from
    the main process's and broadcast, so replicas stay equal (the dead latents are the same on every process, their
    counters being agreed)."""
    dead = sae._find_dead_latents()
    dead = dead[dead >= sae.config.core_size]
    x = activations.reshape(-1, sae.config.d_in).to(sae.W_dec.dtype)
    dead = dead[: len(x)]
    if len(dead) == 0:
        return dead
    residual = (x - sae.decode(sae.encode(x, batch_topk=True))).float()
    errors = residual.square().sum(1)
    weights = errors if bool(errors.sum() > 0) else torch.ones_like(errors)
    drawn = torch.multinomial(weights.cpu(), len(dead), replacement=False, generator=generator).to(x.device)
    directions = residual[drawn]
    directions /= directions.norm(dim=1, keepdim=True).clamp_min(torch.finfo(directions.dtype).tiny)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(directions, src=0)

    frozen = sae.config.frozen_rows
    alive = sae.tokens_since_fired[frozen:] < sae.config.dead_tokens_threshold
    alive_norms = sae.W_enc_trainable.norm(dim=1)[alive]
    encoder_norm = ENCODER_SCALE * (float(alive_norms.mean()) if len(alive_norms) else 1.0)
    rows = {sae.W_dec: dead, sae.W_enc_trainable: dead - frozen, sae.b_enc: dead}
    sae.W_dec[dead] = directions.to(sae.W_dec.dtype)
    sae.W_enc_trainable[dead - frozen] = (encoder_norm * directions).to(sae.W_enc_trainable.dtype)
    sae.b_enc[dead] = 0
    for parameter, index in rows.items():
        state = optimizer.state.get(parameter, {}) if optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0
    sae.tokens_since_fired[dead] = 0
    sae.refresh_dead_latents()
    return dead


class DeadLatentResampler(TrainerCallback):
    """Resamples `trainer`'s dead latents every `resample_dead_every` optimiser steps until the learning rate
    decays, on the step's last batch and a generator seeded by the run's seed and the step (a resumed run resamples
    as an uninterrupted one: the checkpoint after a step holds its resampling)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.resampled = 0
        """Latents resampled since the trainer's last log."""

    def on_step_end(self, args, state, control, **kwargs):
        every = args.resample_dead_every
        decays_from = state.max_steps - int(args.decay_fraction * state.max_steps)
        if state.global_step % every or state.global_step >= decays_from:
            return
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + state.global_step)
        trainer = self.trainer
        dead = resample_dead_latents(trainer.sae, trainer.last_training_batch, trainer.optimizer, generator)
        self.resampled += len(dead)
        logger.info("Step %d: %d dead latents resampled", state.global_step, len(dead))
