"""One SAE training run, wired from arguments: LM → activations → `DMSAEModel` → `DMSAETrainer` → saved model.

The scripts and the distillation cycles call this; it holds no training logic of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from .activations import ActivationArguments, activation_dataset, load_language_model
from .configuration_dmsae import SAEBENCH_GROUP_FRACTIONS, DMSAEConfig, matryoshka_group_sizes
from .modeling_dmsae import DMSAEModel
from .trainer import DMSAETrainer, DMSAETrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class SAEArguments:
    """The SAE to train (see `DMSAEConfig` for each field's meaning)."""

    dict_size: int = field(default=4096, metadata={"help": "Number of latents, core included."})
    k: int = field(default=64, metadata={"help": "Target L0 of the SAEBench-equivalent baseline."})
    k_noncore: int | None = field(default=None, metadata={"help": "Non-core BatchTopK target (default: Eq. 4)."})
    sparsity: str = field(default="dense_core", metadata={"help": "dense_core or sparse_core."})
    group_fractions: list[float] = field(
        default_factory=lambda: list(SAEBENCH_GROUP_FRACTIONS),
        metadata={"help": "Matryoshka group fractions of the non-core latents; the rest forms the last group."},
    )
    aux_coef: float = field(default=1 / 32, metadata={"help": "AuxK loss weight."})
    dead_tokens_threshold: int = field(default=10_000_000, metadata={"help": "Tokens without firing = dead."})
    threshold_beta: float = field(default=0.999, metadata={"help": "EMA decay of the inference threshold."})


@dataclass
class ActivationData:
    """The LM and the training / held-out activation datasets of a run."""

    lm: torch.nn.Module
    tokenizer: object
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset | None
    d_in: int
    norm_factor: float


def prepare_activations(args: ActivationArguments, training_args: DMSAETrainingArguments) -> ActivationData:
    """Load the LM and build (or reopen) the activation datasets; with a cache, the main process writes it while
    the others wait, then all read it. (Going through `training_args` sets up the processes as it says.)"""
    lm, tokenizer = load_language_model(args)
    lm.to(training_args.device)
    with training_args.main_process_first(desc="activations"):
        train = activation_dataset(args, lm, tokenizer, args.dataset_split, args.num_tokens)
        held_out = activation_dataset(args, lm, tokenizer, args.eval_split, args.eval_tokens) if args.eval_tokens else None
    return ActivationData(lm, tokenizer, train, held_out, train.d_in, train.norm_factor)


def sae_config(sae: SAEArguments, acts: ActivationArguments, data: ActivationData, **overrides) -> DMSAEConfig:
    """The `DMSAEConfig` of a new SAE on these activations; `overrides` (e.g. a core) win."""
    core_size = overrides.get("core_size", 0)
    settings = dict(
        d_in=data.d_in,
        dict_size=sae.dict_size,
        group_sizes=matryoshka_group_sizes(sae.dict_size - core_size, tuple(sae.group_fractions)),
        k=sae.k,
        k_noncore=sae.k_noncore,
        sparsity=sae.sparsity,
        aux_coef=sae.aux_coef,
        dead_tokens_threshold=sae.dead_tokens_threshold,
        threshold_beta=sae.threshold_beta,
        norm_factor=data.norm_factor,
        base_model=acts.model_name_or_path,
        hook_layer=acts.hook_layer,
        hook_name=acts.hook_name,
    )
    return DMSAEConfig(**{**settings, **overrides})


def write_json_atomically(path: Path, data) -> None:
    """Write `data` as JSON through a temporary file renamed into place: a crash never leaves half a record."""
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(data, indent=2))
    os.replace(staging, path)


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` folder whose trainer state was written (the Trainer writes it last)."""
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    return str(complete[-1]) if complete else None


def train_sae(model: DMSAEModel, data: ActivationData, args: DMSAETrainingArguments, callbacks=None) -> DMSAETrainer:
    """Train `model`, resuming from the last complete checkpoint in `args.output_dir` if there is one, and save the
    final model there."""
    trainer = DMSAETrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                           callbacks=callbacks)  # fmt: skip
    logger.info("Training process %d of %d on %s", args.process_index, args.world_size, args.device)
    checkpoint = last_complete_checkpoint(args.output_dir)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(args.output_dir)
    return trainer


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None, shared: tuple = ()) -> tuple:
    """Parse `[config.json] [--field value …]`: the JSON file's fields, overridden by the command line. JSON fields
    of the `shared` dataclasses (other scripts' arguments in a shared config file) are skipped; unknown ones are
    an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)}
    skipped = {f.name for cls in shared for f in dataclasses.fields(cls)} - known
    from_file: list[str] = []
    if argv and argv[0].endswith(".json"):
        for key, value in json.loads(Path(argv.pop(0)).read_text()).items():
            if value is None or key in skipped:
                continue
            values = value if isinstance(value, list) else [value]
            from_file += [f"--{key}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values)]
    return parser.parse_args_into_dataclasses(args=from_file + argv)
