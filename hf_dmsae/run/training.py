"""`train_sae`: one `DMSAETrainer` run on a training slice, its step count from the slice's budget, resumed from the
last checkpoint that verifies; and the trained model read back only while its bytes are the ones saved."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..data.slices import TokenSlice
from ..model.modeling_dmsae import DMSAEModel
from ..utils.integrity import IntegrityError, checksums, read_json, verify_checksums, write_json_atomically
from ..utils.stages import stage
from .convergence import ConvergenceCallback, run_convergence
from .data import RunData
from .trainer import CHECKSUMS, DMSAETrainer, DMSAETrainingArguments

logger = logging.getLogger(__name__)


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` folder whose files match the checksums written after them; a damaged or unfinished
    one is passed over (with a warning) for the one before."""
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for checkpoint in reversed(checkpoints):
        if not (checkpoint / CHECKSUMS).is_file():
            logger.warning("%s was not finished (no %s): passed over", checkpoint, CHECKSUMS)
            continue
        try:
            verify_checksums(checkpoint, read_json(checkpoint / CHECKSUMS, {}))
        except IntegrityError as error:
            logger.warning("%s is damaged (%s): passed over", checkpoint, error)
            continue
        return str(checkpoint)
    return None


MODEL_FILES = ("config.json", "model.safetensors")
CONVERGENCE = "convergence.json"
CONVERGENCE_ROWS = 4096
"""Held-out and training rows a run measures its convergence on (`run.convergence`)."""


def first_rows(batches, rows: int) -> torch.Tensor:
    """The first `rows` rows of `batches` (fewer if they hold fewer)."""
    taken, count = [], 0
    for batch in batches:
        taken.append(batch[: rows - count])
        count += len(taken[-1])
        if count >= rows:
            break
    return torch.cat(taken) if taken else torch.empty(0)


def load_trained_model(folder: str | Path) -> DMSAEModel:
    """The model `train_sae` saved in `folder`, refused if its files changed since (their checksums are written
    after them)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        raise IntegrityError(f"{folder} has no {CHECKSUMS}: its model was not saved by a finished training run")
    verify_checksums(folder, read_json(folder / CHECKSUMS, {}))
    return DMSAEModel.from_pretrained(folder)


def training_steps(rows: int, args: DMSAETrainingArguments) -> int:
    """Optimiser steps that read a slice's `rows` (its token budget) over all processes `num_train_epochs` times, or
    `max_steps` if given, which must fit in them: more would read rows once more than asked from a cache, and past
    the slice (into the next one's tokens) from a stream."""
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    per_pass, passes = rows // per_step, int(args.num_train_epochs)
    if per_pass < 1:
        raise ValueError(
            f"num_tokens={rows} is less than one optimiser step's {per_step} rows "
            "(per_device_train_batch_size × processes × gradient_accumulation_steps)"
        )
    if args.max_steps > per_pass * passes:
        raise ValueError(
            f"max_steps={args.max_steps} is invalid: the token budget num_tokens={rows} holds {per_pass} "
            f"optimiser steps of {per_step} rows a pass, {passes} pass(es) asked for (num_train_epochs); raise "
            "num_tokens or num_train_epochs, or lower max_steps"
        )
    return args.max_steps if args.max_steps > 0 else per_pass * passes


def train_sae(
    model: DMSAEModel,
    data: RunData,
    piece: TokenSlice,
    args: DMSAETrainingArguments,
    callbacks=None,
    core_usage_rows: torch.Tensor | None = None,
) -> DMSAETrainer:
    """Train `model` on the training slice `piece` (its step count from the slice's budget), resuming from the last
    complete checkpoint in `args.output_dir`; save the final model there and record where the slice ended.
    `core_usage_rows`: see `DMSAETrainer`."""
    args = dataclasses.replace(args, max_steps=training_steps(piece.rows, args))
    train = data.training_data(piece, args)
    trainer = DMSAETrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=data.eval_dataset(),
        callbacks=callbacks,
        core_usage_rows=core_usage_rows,
    )
    held_out = first_rows(data.eval_batches(CONVERGENCE_ROWS), CONVERGENCE_ROWS)
    measured = ConvergenceCallback(trainer, held_out, train.sample(CONVERGENCE_ROWS))
    trainer.add_callback(measured)
    logger.info(
        "Training process %d of %d on %s: %d steps on slice %r",
        args.process_index,
        args.world_size,
        args.device,
        args.max_steps,
        piece.name,
    )
    checkpoint = last_complete_checkpoint(args.output_dir)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
    first_step = (
        read_json(Path(checkpoint) / "trainer_state.json", {"global_step": int})["global_step"] if checkpoint else 0
    )
    with stage("train") as timed:
        trainer.train(resume_from_checkpoint=checkpoint)
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        timed.tokens = (trainer.state.global_step - first_step) * rows_per_step
    trainer.convergence = run_convergence(trainer, piece.rows, measured, train)
    trainer.save_model(args.output_dir)
    if args.should_save:
        write_json_atomically(Path(args.output_dir) / CONVERGENCE, trainer.convergence)
        write_json_atomically(Path(args.output_dir) / CHECKSUMS, checksums(args.output_dir, list(MODEL_FILES)))
    trainer.accelerator.wait_for_everyone()
    data.finish_slice(piece, train)
    return trainer
