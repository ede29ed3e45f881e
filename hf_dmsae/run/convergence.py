"""`ConvergenceCallback`: a training run measures whether it converges while it trains (`evaluation.convergence`).

At fixed steps (`measured_steps`: tenths of training and the bounds of the last fifth before the decay) it measures
held-out FVU, FVU on rows of its own training slice and the share of latents near their initial decoder direction,
into the Trainer's log history (`convergence_*`), which checkpoints keep, so a resumed run has every measurement an
uninterrupted one has. The initial decoder rows it compares with are kept in the run folder from the first step.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from ..data.cache import ActivationCache
from ..evaluation.convergence import convergence_record, init_sample, measured_steps, share_near_init
from ..evaluation.held_out import fraction_of_variance_unexplained, in_inference_mode
from ..utils.integrity import saving

INITIAL_DECODER = "initial_decoder.safetensors"
MEASURED = ("heldout_fvu", "train_fvu", "share_near_init")


class ConvergenceCallback(TrainerCallback):
    """Measures `trainer`'s model on `held_out` and `train_rows` (raw activations; a run without held-out rows has
    no held-out FVU) at `measured_steps`; the latents that fired on them at the last measurement are kept for the
    run's dead fraction."""

    def __init__(self, trainer, held_out: torch.Tensor, train_rows: torch.Tensor):
        self.trainer, self.held_out, self.train_rows = trainer, held_out, train_rows
        self.latents = self.initial = self.fired = None
        self.steps: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        sae = self._model()
        self.latents = init_sample(sae.config.dict_size)
        self.steps = measured_steps(state.max_steps, args.decay_fraction)
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
        if state.global_step in self.steps:
            state.log_history.append({"step": state.global_step, **self.measure()})

    @torch.no_grad()
    def measure(self) -> dict[str, float | None]:
        sae = self._model()
        (heldout, heldout_fired), (train, train_fired) = (
            inference_pass(sae, x) for x in (self.held_out, self.train_rows)
        )
        self.fired = heldout_fired | train_fired
        near = None
        if self.initial is not None:
            near = share_near_init(self.initial, sae.W_dec.detach()[self.latents].cpu())
        return {"convergence_heldout_fvu": heldout, "convergence_train_fvu": train, "convergence_share_near_init": near}

    def silent_share(self) -> float | None:
        """The share of latents that fired on none of the measured rows in inference mode at the last measurement
        (taken now if this process made none: a run resumed at its last step); None without rows."""
        if self.fired is None:
            self.measure()
        if not len(self.held_out) + len(self.train_rows):
            return None
        return float((~self.fired).float().mean())

    def _model(self):
        return whole_model_of(self.trainer)


def whole_model_of(trainer):
    """The trainer's model whole (an unsharded copy under FSDP)."""
    from .trainer import whole_model

    return whole_model(trainer.sae)


@torch.no_grad()
def inference_pass(sae, rows: torch.Tensor, batch_size: int = 1024) -> tuple[float | None, torch.Tensor]:
    """FVU of `sae` in inference mode on raw activations `rows` (None for no rows), as `activation_metrics` has it,
    and which latents fired on any row; encoded `batch_size` rows at a time (a batch's dense pre-activations are
    `batch_size × dict_size`)."""
    fired = torch.zeros(sae.config.dict_size, dtype=torch.bool, device=sae.device)
    if not len(rows):
        return None, fired
    x, reconstruction = [], []
    for part, latents in in_inference_mode(sae, rows.split(batch_size)):
        x.append(part)
        reconstruction.append(sae.decode_sparse(latents))
        fired[latents.cols] = True
    x, reconstruction = torch.cat(x), torch.cat(reconstruction)
    return float(fraction_of_variance_unexplained(x.float(), reconstruction.float())), fired


def measurements(log_history: list[dict]) -> list[dict]:
    """A run's convergence measurements, one per measured step, from its Trainer's log history."""
    return [
        {"step": entry["step"], **{name: entry[f"convergence_{name}"] for name in MEASURED}}
        for entry in log_history
        if "convergence_heldout_fvu" in entry
    ]


@torch.no_grad()
def fired_latents(sae, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Which of `sae`'s latents fire, in inference mode, on any row of `batches` (raw activations)."""
    fired = torch.zeros(sae.config.dict_size, dtype=torch.bool, device=sae.device)
    for _, latents in in_inference_mode(sae, batches):
        fired[latents.cols] = True
    return fired


def silent_over_a_pass(sae, train) -> float | None:
    """The share of `sae`'s latents that fire on none of the rows of its training slice in inference mode, for a
    cached slice (`ActivationCache`; None for a stream, which reads each row once)."""
    if not isinstance(train, ActivationCache):
        return None
    return float((~fired_latents(sae, train.batches(PASS_BATCH_ROWS))).float().mean())


PASS_BATCH_ROWS = 4096


def run_convergence(trainer, rows_per_pass: int, measured: ConvergenceCallback, train) -> dict:
    """The `convergence` object of the model `trainer` trained on `train` (its slice's rows, a cache or a stream;
    `evaluation.convergence.convergence_record`). Its dead latents are counted over a pass two ways
    (`DEAD_OVER_A_PASS`): not fired in training over the last pass (all of training when there is one), and fired
    on none of the slice's rows in inference mode now; and, not counted, on none of the rows `measured` measured on."""
    args, state = trainer.args, trainer.state
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens = state.global_step * per_step
    window = min(tokens, rows_per_pass - rows_per_pass % per_step)
    in_training = float((trainer.sae.tokens_since_fired >= window).float().mean())
    dead = {
        "in_training": in_training,
        "in_inference": silent_over_a_pass(whole_model_of(trainer), train),
        "on_rows": measured.silent_share(),
    }
    return convergence_record(
        measurements(state.log_history),
        steps=state.global_step,
        tokens=tokens,
        epochs=int(args.num_train_epochs),
        decay_fraction=args.decay_fraction,
        dead_fraction=dead,
        resampled_latents=sum(entry.get("resampled_latents", 0) for entry in state.log_history),
    )
