"""`DMSAETrainer`: the `transformers.Trainer` that trains a `DMSAEModel` on activations.

What it adds to the Trainer: the loss and metrics from the model output, the decoder's unit-norm constraint around
every optimiser step (parallel gradient projected out after backward, rows renormalised after the step; switched off
by `unit_norm_decoder=False` for ablations), the decoder bias started at the geometric median of a first batch (and
held there with `train_decoder_bias=False`), and SAE metrics in the logs (per-prefix loss, FVU, L0s, dead
fraction, threshold), the package's `evaluate` metrics (FVU, L0s) on `eval_dataset`, and the inference threshold
calibrated at the end. Everything else (accelerate, DDP/FSDP, bf16, checkpoints and exact resumption, progress bars,
`report_to`) is the Trainer's own. The dead-latent counters and the threshold are model buffers, so checkpoints carry
them and a resumed run continues them.

No training step waits for the device (a CUDA host runs ahead): what needs a value read back — the input's NaN/inf
check, the loss's finiteness, the set of dead latents AuxK reads — happens at logging steps, where the logged metrics
are read anyway; the dead latents found there serve AuxK until the next log.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..data.activations import ActivationStream, collate_activations
from ..evaluation.core_usage import core_usage
from ..evaluation.held_out import SAEEvalMetrics, active_counts, fraction_of_variance_unexplained
from ..model.kernels import release_reused_buffers
from ..model.modeling_dmsae import DMSAEModel
from ..utils.checks import check_ranges
from ..utils.integrity import checksums, read_json, saving, write_json_atomically
from .resampling import DeadLatentResampler

logger = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
"""Written into a checkpoint after everything else: the SHA-256 of its files. A checkpoint without it, or whose files
no longer match it, is not resumed from."""


def stream_state_file(rank: int) -> str:
    return f"stream-rank{rank}.json"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: nothing trained after that point is worth keeping."""


@dataclass
class DMSAETrainingArguments(TrainingArguments):
    """`TrainingArguments` with SAE defaults: activations are the only input column; the learning rate warms up,
    stays constant and decays linearly over the last `decay_fraction` of the steps (as dictionary_learning)."""

    init_decoder_bias_rows: int = field(
        default=4096, metadata={"help": "Rows of the first batch whose geometric median starts b_dec (0: keep 0)."}
    )
    calibrate_threshold_rows: int = field(
        default=16_384,
        metadata={
            "help": "Rows of the training data the inference threshold is calibrated on at the end (0: keep "
            "the training EMA)."
        },
    )
    train_decoder_bias: bool = field(
        default=True, metadata={"help": "Train b_dec (False: it keeps its initial value, the geometric median)."}
    )
    unit_norm_decoder: bool = field(
        default=True,
        metadata={"help": "Keep decoder rows unit norm (Eq. 5's constraint; False: rows are free, for ablations)."},
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "The Trainer's check of every step's loss (waits for the device at each step); a non-finite "
            "loss ends training at the next log anyway."
        },
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Activation datasets have one column."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam learning rate."})
    core_threshold_learning_rate: float = field(
        default=0.01,
        metadata={
            "help": "`jumprelu_core`: Adam learning rate of the core thresholds' logs, on the same schedule. Adam "
            "moves a log threshold by about this much a step whatever the penalty's weight, so it sets how far "
            "the thresholds can rise within a run: from 0.001 to ~0.05 in ~400 steps at 0.01, to ~0.0016 in 1000 "
            "at an LM's learning rate of 5e-4."
        },
    )
    lr_scheduler_type: str = field(default="warmup_stable_decay", metadata={"help": "Learning-rate schedule."})
    decay_fraction: float = field(default=0.2, metadata={"help": "Share of steps in the final linear decay."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a fraction: of all steps)."})
    resample_dead_every: int = field(
        default=0,
        metadata={
            "help": "Resample the dead non-core latents every this many optimiser steps until the learning rate "
            "decays (`hf_dmsae.run.resampling`; 0: never, AuxK alone revives them). On the embedded default it "
            "made dead latents worse (reports/convergence)."
        },
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping (0: none)."})
    num_train_epochs: float = field(
        default=1.0,
        metadata={
            "help": "Passes over the training slice, a whole number, each in a new shuffled order: a run's steps are "
            "its token budget (num_tokens) in optimiser steps times this, or max_steps within them. Several "
            "passes read a cached slice (--activation_cache) again; a streamed run refuses them."
        },
    )
    batch_eval_metrics: bool = field(
        default=True, metadata={"help": "Evaluation metrics are fed batch by batch; no [B, n] latents are kept."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every this many steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    use_cpu: bool | None = field(
        default=None,
        metadata={
            "help": "Train on the CPU (default: when no accelerator is present, so that `accelerate launch "
            "--multi_gpu --num_processes N` runs DDP over gloo on a CPU machine)."
        },
    )

    def __post_init__(self):
        check_ranges(
            self,
            learning_rate="> 0",
            core_threshold_learning_rate="> 0",
            per_device_train_batch_size=">= 1",
            per_device_eval_batch_size=">= 1",
            gradient_accumulation_steps=">= 1",
            decay_fraction="[0, 1]",
            warmup_steps=">= 0",
            init_decoder_bias_rows=">= 0",
            calibrate_threshold_rows=">= 0",
            max_grad_norm=">= 0",
            resample_dead_every=">= 0",
            weight_decay=">= 0",
            adam_beta1="[0, 1)",
            adam_beta2="[0, 1)",
            adam_epsilon=">= 0",
            logging_steps="> 0",
            save_steps="> 0",
        )
        if self.num_train_epochs < 1 or self.num_train_epochs != int(self.num_train_epochs):
            raise ValueError(
                f"num_train_epochs={self.num_train_epochs} is invalid: passes over the training slice are a whole "
                "number, at least 1"
            )
        if self.use_cpu is None:
            self.use_cpu = not torch.accelerator.is_available()
        super().__post_init__()
        if self.bf16 and self.use_cpu:
            warn_slow_cpu_bf16()


@functools.cache
def warn_slow_cpu_bf16() -> None:
    """Warn once that bf16 autocast on a CPU without native bf16 (AVX-512 BF16 or AMX) emulates it, running the
    training step several times slower than fp32 (`scripts/bench.py --parts steps`: 8.2× the fp32 limit at 4096
    latents on such a CPU, 1.09× on one with it)."""
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        logger.warning(
            "--bf16 on this CPU, which has no native bf16 (AVX-512 BF16 or AMX): the training step runs several "
            "times slower than in fp32; leave --bf16 out on this machine"
        )


class _SAEStepCallback(TrainerCallback):
    """Finds the dead latents when training starts (after a checkpoint is loaded) and renormalises decoder rows right
    after each optimiser step (unless `unit_norm_decoder` is off)."""

    def __init__(self, trainer: DMSAETrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.sae.refresh_dead_latents()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if args.unit_norm_decoder:
            self.trainer.sae.normalize_decoder()


class DMSAETrainer(Trainer):
    """Trains a `DMSAEModel`; `train_dataset` yields `{"activations": [d_in]}` rows and has `sample(n)` (the
    datasets of `hf_dmsae.activations`). With `core_usage_rows` (raw held-out activations), every training log also
    holds `core_usage` on them as `core_usage_*`: Fig. 3's countings over training, kept through a resume."""

    def __init__(
        self, model: DMSAEModel, args: DMSAETrainingArguments, core_usage_rows: torch.Tensor | None = None, **kwargs
    ):
        self.core_usage_rows = core_usage_rows
        kwargs.setdefault("data_collator", collate_activations)
        if args.batch_eval_metrics:
            kwargs.setdefault("compute_metrics", SAEEvalMetrics())
        if isinstance(kwargs.get("train_dataset"), ActivationStream):
            args.ignore_data_skip = True  # the stream resumes at its recorded position instead
        model.b_dec.requires_grad_(args.train_decoder_bias)  # before the Trainer builds its optimiser
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(_SAEStepCallback(self))
        self.resampler = None
        if args.resample_dead_every:
            if self.is_fsdp_enabled:
                raise ValueError("resample_dead_every is not supported under FSDP (its rows are sharded); use DDP or 0")
            self.resampler = DeadLatentResampler(self)
            self.add_callback(self.resampler)
        self.last_training_batch: torch.Tensor | None = None
        """The activations of the last training batch (what resampling draws its rows from)."""
        # Training metric sums since the last log, their step count, and the input rows with NaN or inf in them.
        self._metric_sums = defaultdict(lambda: torch.zeros((), device=args.device))
        self._metric_steps = 0
        self._nonfinite_rows = torch.zeros((), dtype=torch.long, device=args.device)

    @property
    def sae(self) -> DMSAEModel:
        return self.accelerator.unwrap_model(self.model)

    def get_train_dataloader(self):
        """A stream harvests this process's own rows, so its batches are not dispatched from the main process. A
        cache is read in whole batches: a pass over it is `rows // batch` steps, as `training_steps` counts them,
        and a step never reads a short batch (evaluation still reads every row)."""
        if isinstance(self.train_dataset, ActivationStream):
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=None, collate_fn=collate_activations)
        args, self.args = self.args, copy.copy(self.args)  # a copy, not a replace: that would set up devices again
        self.args.dataloader_drop_last = True
        try:
            return super().get_train_dataloader()
        finally:
            self.args = args

    def train(self, resume_from_checkpoint=None, **kwargs):
        """As `Trainer.train`; a fresh run first sets `b_dec` to the geometric median of the dataset's first rows
        (`train_dataset.sample(n)`: the same rows on every process, read before the model is wrapped). A stream
        resumed from a checkpoint continues at the row after the last one trained on."""
        if not resume_from_checkpoint and self.state.global_step == 0 and self.args.init_decoder_bias_rows > 0:
            self.model.init_decoder_bias(self.train_dataset.sample(self.args.init_decoder_bias_rows))
        if resume_from_checkpoint and isinstance(self.train_dataset, ActivationStream):
            checkpoint = Path(resume_from_checkpoint)
            step = read_json(checkpoint / "trainer_state.json", {"global_step": int})["global_step"]
            state = read_json(checkpoint / stream_state_file(self.args.process_index), {"windows": list})
            self.train_dataset.resume(state, step * self.args.gradient_accumulation_steps)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        release_reused_buffers()
        if self.args.calibrate_threshold_rows > 0:
            self.calibrate_threshold()
        return output

    def calibrate_threshold(self) -> None:
        """Calibrate the inference threshold on the first training rows (the same on every process; under FSDP on
        an unsharded copy, whose threshold is copied back into the replicated buffer)."""
        sae = self.sae
        rows = self.train_dataset.sample(self.args.calibrate_threshold_rows).to(self.args.device)
        threshold = whole_model(sae).calibrate_threshold(rows)
        sae.threshold.fill_(threshold)
        logger.info("Inference threshold calibrated on %d rows: %.4g", len(rows), threshold)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, with each process's stream position before it and the checksums of every
        file after it."""
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        with saving(folder):
            if isinstance(self.train_dataset, ActivationStream):
                folder.mkdir(parents=True, exist_ok=True)
                write_json_atomically(
                    folder / stream_state_file(self.args.process_index), self.train_dataset.state_dict()
                )
            super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            with saving(folder / CHECKSUMS):
                (folder / CHECKSUMS).write_text(json.dumps(checksums(folder), indent=2))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """As the Trainer's, with a failed write named (the folder and the cause)."""
        with saving(output_dir or self.args.output_dir):
            super().save_model(output_dir, _internal_call)

    def create_optimizer(self, model=None):
        """As the Trainer's, with a `jumprelu_core` model's log thresholds in a group of their own at
        `core_threshold_learning_rate` (no weight decay)."""
        optimizer = super().create_optimizer(model)
        threshold = self.sae.core_log_threshold
        if threshold is None or not threshold.requires_grad:
            return optimizer
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p is not threshold]
        optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
        optimizer.add_param_group(
            {"params": [threshold], "lr": self.args.core_threshold_learning_rate, "weight_decay": 0.0}
        )
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.args.lr_scheduler_type == "warmup_stable_decay":
            decay = int(self.args.decay_fraction * num_training_steps)
            self.args.lr_scheduler_kwargs = {"num_decay_steps": decay, **(self.args.lr_scheduler_kwargs or {})}
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, return_latents=False)
        if model.training:
            self._accumulate_metrics(inputs["activations"], outputs)
            self.last_training_batch = inputs["activations"]
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Backward, then project the decoder gradient onto the rows' tangent space (linear, so it commutes with
        gradient accumulation)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.unit_norm_decoder:
            self.sae.remove_parallel_decoder_grad()
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss and, for `compute_metrics`, the reconstructions and per-row active core / non-core
        counts as predictions and the activations as labels (the [B, n] latents are not gathered)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            outputs = model(**inputs, return_latents=self.compute_metrics is not None)
        if self.compute_metrics is None:
            return outputs.loss.detach(), None, None
        counts = active_counts(outputs.latents, self.sae.config.core_size)
        x = inputs["activations"].reshape(-1, self.sae.config.d_in)
        return outputs.loss.detach(), (outputs.reconstruction, counts), x

    @torch.no_grad()
    def _accumulate_metrics(self, activations: torch.Tensor, outputs) -> None:
        x = activations.reshape(-1, activations.shape[-1]).float()
        self._nonfinite_rows += (~torch.isfinite(x)).any(1).sum()
        metrics = {
            "fvu": fraction_of_variance_unexplained(x, outputs.reconstruction.float()),
            "aux_loss": outputs.aux_loss,
            "l0_core": outputs.l0_core,
            "l0_noncore": outputs.l0_noncore,
            "l0": outputs.l0_core + outputs.l0_noncore,
        }
        for i, prefix_loss in enumerate(outputs.prefix_losses):
            metrics[f"prefix_loss_{i}"] = prefix_loss
        for name, value in metrics.items():
            self._metric_sums[name] += value.detach().float()
        self._metric_steps += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the SAE metrics of the training steps since the last log, averaged over steps and processes, to the
        Trainer's own training log. Checked here, where the metrics are read anyway, so that no step waits for the
        device: input rows with NaN or inf end training with `ValueError`, a non-finite loss with
        `TrainingDivergedError`; and the dead latents AuxK reads are found again."""
        if "loss" in logs and self._metric_steps:
            if int(self.accelerator.reduce(self._nonfinite_rows, reduction="sum")):
                raise ValueError(
                    f"activations contain NaN or inf values: {int(self._nonfinite_rows)} rows of this "
                    f"process in the steps before step {self.state.global_step}"
                )
            names = sorted(self._metric_sums)
            sums = torch.stack([self._metric_sums[n] for n in names])
            averaged = self.accelerator.reduce(sums / self._metric_steps, reduction="mean")
            logs.update({name: round(float(v), 6) for name, v in zip(names, averaged, strict=True)})
            self._metric_sums.clear()
            self._metric_steps = 0
            losses = {k: v for k, v in logs.items() if k.startswith("prefix_loss") or k == "aux_loss"}
            if not all(math.isfinite(v) for v in losses.values()):
                raise TrainingDivergedError(
                    f"the loss became non-finite by step {self.state.global_step} ({losses}): training diverged "
                    f"(learning rate {self.args.learning_rate:g}); lower it and start again in a new output_dir"
                )
            self._check_finite_training_state(logs.get("grad_norm"))
        if "loss" in logs:
            sae = self.sae
            sae.refresh_dead_latents()
            logs["dead_fraction"] = len(sae.dead_latents) / sae.config.dict_size
            logs["threshold"] = float(sae.threshold)
            if self.resampler is not None:
                logs["resampled_latents"], self.resampler.resampled = self.resampler.resampled, 0
            if self.core_usage_rows is not None:
                usage = core_usage(whole_model(sae), self.core_usage_rows)
                logs.update({f"core_usage_{k}": v for k, v in usage.items() if v is not None})
        super().log(logs, *args, **kwargs)

    def _check_finite_training_state(self, grad_norm: float | None) -> None:
        """Raise `TrainingDivergedError` naming the first parameter that, or whose optimiser state, holds NaN or
        inf, or for a non-finite gradient norm (under fp16 the loss scaler skips such steps itself). A loss can stay
        finite while training is lost: a penalty whose gradient's square overflows leaves Adam's second moment
        infinite and the parameter frozen at its start; a threshold driven to NaN switches its latent off."""
        labelled = []
        for name, parameter in self.sae.named_parameters():
            if parameter.requires_grad:
                labelled.append((f"parameter {name!r}", parameter))
                state = self.optimizer.state.get(parameter, {}) if self.optimizer is not None else {}
                labelled += [(f"the optimiser's {key} of {name!r}", v) for key, v in state.items() if _is_float(v)]
        local = [t.to_local() if isinstance(t, DTensor) else t for _, t in labelled]
        counts = torch.stack([(~torch.isfinite(t)).sum() for t in local]).to(self.args.device)
        counts = self.accelerator.reduce(counts, reduction="sum").tolist()
        if bad := [(label, count) for (label, _), count in zip(labelled, counts, strict=True) if count]:
            label, count = bad[0]
            raise TrainingDivergedError(
                f"{label} holds {count} NaN or infinite values by step {self.state.global_step}: "
                f"{self._overflow_hint()}"
            )
        if grad_norm is not None and not math.isfinite(grad_norm) and not self.args.fp16:
            raise TrainingDivergedError(
                f"the gradient norm became {grad_norm} by step {self.state.global_step}: {self._overflow_hint()}"
            )

    def _overflow_hint(self) -> str:
        sae, args = self.sae.config, self.args
        settings = f"learning rate {args.learning_rate:g}"
        if self.sae.core_log_threshold is not None:
            settings += f", core_threshold_learning_rate {args.core_threshold_learning_rate:g}"
        if sae.core_penalty:
            settings += f", core_sparsity_coef {sae.core_sparsity_coef:g}"
        return f"training diverged or overflowed ({settings}); lower them and start again in a new output_dir"


def _is_float(value) -> bool:
    return torch.is_tensor(value) and value.is_floating_point()


def whole_model(sae: DMSAEModel) -> DMSAEModel:
    """`sae` itself, or for FSDP-sharded weights an unsharded copy on every process (for scoring)."""
    if not isinstance(sae.W_dec, DTensor):
        return sae
    state = get_model_state_dict(sae, options=StateDictOptions(full_state_dict=True))
    whole = DMSAEModel(sae.config).to(sae.b_enc.device)
    whole.load_state_dict(state)
    return whole
