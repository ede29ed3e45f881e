"""`ConvergenceCallback`: a training run measures whether it converges while it trains (`evaluation.convergence`).

At fixed steps (`measured_steps`: tenths of training and the bounds of the last fifth before the decay) it measures
held-out FVU, FVU on rows of its own training slice and the share of latents near their initial decoder direction,
into the Trainer's log history (`convergence_*`), which checkpoints keep, so a resumed run has every measurement an
uninterrupted one has. The initial decoder rows it compares with are kept in the run folder from the first step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from ..evaluation.convergence import convergence_record, init_sample, measured_steps, share_near_init
from ..evaluation.held_out import fraction_of_variance_unexplained
from ..utils.integrity import saving

INITIAL_DECODER = "initial_decoder.safetensors"
MEASURED = ("heldout_fvu", "train_fvu", "share_near_init")


class ConvergenceCallback(TrainerCallback):
    """Measures `trainer`'s model on `held_out` and `train_rows` (raw activations; a run without held-out rows has
    no held-out FVU) at `measured_steps`."""

    def __init__(self, trainer, held_out: torch.Tensor, train_rows: torch.Tensor):
        self.trainer, self.held_out, self.train_rows = trainer, held_out, train_rows
        self.latents = self.initial = None

    def on_train_begin(self, args, state, control, **kwargs):
        sae = self._model()
        self.latents = init_sample(sae.config.dict_size)
        path = Path(args.output_dir) / INITIAL_DECODER
        if state.global_step == 0:
            # Kept in half precision (a direction's cosine needs no more), the same whether resumed or not.
            self.initial = sae.W_dec.detach()[self.latents].cpu().half()
            if args.should_save:
                path.parent.mkdir(parents=True, exist_ok=True)
                with saving(path):
                    save_file({"rows": self.initial, "latents": self.latents}, path)
        elif path.is_file():  # resumed: the rows kept when it started
            self.initial = load_file(path)["rows"]

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in measured_steps(state.max_steps, args.decay_fraction):
            state.log_history.append({"step": state.global_step, **self.measure()})

    @torch.no_grad()
    def measure(self) -> dict[str, float | None]:
        sae = self._model()
        heldout, train = (inference_fvu(sae, rows) for rows in (self.held_out, self.train_rows))
        near = None
        if self.initial is not None:
            near = share_near_init(self.initial, sae.W_dec.detach()[self.latents].cpu())
        return {"convergence_heldout_fvu": heldout, "convergence_train_fvu": train, "convergence_share_near_init": near}

    def rows(self) -> torch.Tensor:
        """Every row it measures on, held-out and training."""
        return torch.cat([rows for rows in (self.held_out, self.train_rows) if len(rows)])

    def _model(self):
        return whole_model_of(self.trainer)


def whole_model_of(trainer):
    """The trainer's model whole (an unsharded copy under FSDP)."""
    from .trainer import whole_model

    return whole_model(trainer.sae)


@torch.no_grad()
def inference_fvu(sae, rows: torch.Tensor, batch_size: int = 1024) -> float | None:
    """FVU of `sae` in inference mode on raw activations `rows` (None for no rows), as `activation_metrics` has it,
    encoded `batch_size` rows at a time (a batch's dense pre-activations are `batch_size × dict_size`)."""
    if not len(rows):
        return None
    training = sae.training
    sae.eval()
    try:
        x = rows.to(sae.device)
        reconstruction = torch.cat([sae.decode_sparse(sae.encode_sparse(part)) for part in x.split(batch_size)])
    finally:
        sae.train(training)
    return float(fraction_of_variance_unexplained(x.float(), reconstruction.float()))


def measurements(log_history: list[dict]) -> list[dict]:
    """A run's convergence measurements, one per measured step, from its Trainer's log history."""
    return [
        {"step": entry["step"], **{name: entry[f"convergence_{name}"] for name in MEASURED}}
        for entry in log_history
        if "convergence_heldout_fvu" in entry
    ]


@torch.no_grad()
def silent_share(sae, rows: torch.Tensor, batch_size: int = 1024) -> float | None:
    """The share of `sae`'s latents that fire on none of `rows` in inference mode (None for no rows)."""
    if not len(rows):
        return None
    training = sae.training
    sae.eval()
    fired = torch.zeros(sae.config.dict_size, dtype=torch.bool, device=sae.device)
    try:
        for part in rows.to(sae.device).split(batch_size):
            fired[sae.encode_sparse(part).cols] = True
    finally:
        sae.train(training)
    return float((~fired).float().mean())


def run_convergence(trainer, rows_per_pass: int, rows: torch.Tensor) -> dict:
    """The `convergence` object of the model `trainer` trained (`evaluation.convergence.convergence_record`). Its
    dead fraction is the larger of two: latents that did not fire in training over the last pass (all of training
    when there is one, so a latent that fired early and died since is not counted) and latents that fire on none of
    `rows` (the held-out and training rows it was measured on) in inference mode now."""
    args, state = trainer.args, trainer.state
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens = state.global_step * per_step
    window = min(tokens, rows_per_pass - rows_per_pass % per_step)
    in_training = float((trainer.sae.tokens_since_fired >= window).float().mean())
    on_rows = silent_share(whole_model_of(trainer), rows)
    return convergence_record(
        measurements(state.log_history),
        steps=state.global_step,
        tokens=tokens,
        epochs=int(args.num_train_epochs),
        decay_fraction=args.decay_fraction,
        dead_fraction={"in_training": in_training, "on_rows": on_rows},
    )
