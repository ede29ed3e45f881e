"""A run's folder, its data and its training, wired from arguments; the scripts, the distillation and the transfer
call this, and it holds no method of its own.

- `RunState`: `state.json` in the output folder, holding the run's identity (every argument that changes its results,
  and the identity of its inputs: LM weights, dataset, cores, checkpoints), the slices of the token stream it reads
  and what each step produced. A run is resumed only with the same identity; a difference is refused, naming the
  fields. The main process holds a lock on the folder while the run lives.
- `RunData`: the LM and the activations the run reads: its stream statistics, fixed once, and for each slice a cache
  on disk or a stream harvested while training.
- `train_sae`: one `DMSAETrainer` run on a training slice, resumed from the last checkpoint that verifies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .activations import ActivationArguments, ActivationStream, Harvester, StreamStatistics, shuffled_windows
from .attribution import AttributionArguments
from .cache import ActivationCache, AttributionCache, identity_difference
from .configuration_dmsae import SAEBENCH_GROUP_FRACTIONS, DMSAEConfig, matryoshka_group_sizes
from .evaluation import ce_loss_recovered
from .integrity import IntegrityError, checksums, read_json, verify_checksums, write_json_atomically
from .language_model import load_language_model, weights_digest
from .modeling_dmsae import DMSAEModel
from .slices import SliceLayout, TokenSlice
from .stages import stage
from .text import StreamPosition, position_after, sequence_batches
from .trainer import CHECKSUMS, DMSAETrainer, DMSAETrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class SAEArguments:
    """The SAE to train (see `DMSAEConfig` for each field's meaning)."""

    dict_size: int = field(default=4096, metadata={"help": "Number of latents, core included."})
    k: int = field(default=64, metadata={"help": "Target L0 of the SAEBench-equivalent baseline."})
    k_noncore: int | None = field(
        default=None,
        metadata={"help": "Non-core BatchTopK target. Distillation: the same in every cycle (default k). Transfer and "
                  "single runs: default Eq. 4 from k."},
    )
    sparsity: Literal["dense_core", "sparse_core"] = field(
        default="dense_core", metadata={"help": "dense_core: the core is never masked; sparse_core: one BatchTopK."}
    )
    group_fractions: list[float] = field(
        default_factory=lambda: list(SAEBENCH_GROUP_FRACTIONS),
        metadata={"help": "Matryoshka group fractions of the non-core latents; the rest forms the last group."},
    )
    aux_coef: float = field(default=1 / 32, metadata={"help": "AuxK loss weight."})
    prefix_loss_weighting: Literal["sum", "dictionary_learning"] = field(
        default="sum",
        metadata={"help": "sum: Σ of the prefix losses (Eq. 5); dictionary_learning: Σ/G² (G prefixes), as its "
                  "Matryoshka trainer (under Adam: AuxK weighs G² times more)."},
    )
    train_core_bias: bool = field(
        default=True, metadata={"help": "Train the core latents' encoder biases (False: they stay at 0)."}
    )
    dead_tokens_threshold: int = field(default=10_000_000, metadata={"help": "Tokens without firing = dead."})
    threshold_beta: float = field(default=0.999, metadata={"help": "EMA decay of the inference threshold."})

    def __post_init__(self):
        if self.dict_size < 2:
            raise ValueError(f"dict_size={self.dict_size} is invalid: must be at least 2")
        if not 1 <= self.k <= self.dict_size:
            raise ValueError(f"k={self.k} is invalid: must lie in [1, dict_size={self.dict_size}]")
        if self.k_noncore is not None and not 1 <= self.k_noncore < self.dict_size:
            raise ValueError(f"k_noncore={self.k_noncore} is invalid: must lie in [1, dict_size={self.dict_size})")
        if any(f <= 0 for f in self.group_fractions) or sum(self.group_fractions) >= 1:
            raise ValueError(f"group_fractions={self.group_fractions} is invalid: positive, summing to less than 1")
        # Everything else DMSAEConfig checks; building one here reports it now, before any harvesting.
        DMSAEConfig(d_in=1, dict_size=self.dict_size, k=self.k, k_noncore=self.k_noncore, sparsity=self.sparsity,
                    aux_coef=self.aux_coef, dead_tokens_threshold=self.dead_tokens_threshold,
                    prefix_loss_weighting=self.prefix_loss_weighting, train_core_bias=self.train_core_bias,
                    threshold_beta=self.threshold_beta,
                    group_sizes=matryoshka_group_sizes(self.dict_size, tuple(self.group_fractions)))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The run's folder


# The training arguments that change what a run learns (the rest: logging, paths, pushing, evaluation).
TRAINING_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "seed",
                   "weight_decay", "lr_scheduler_type", "warmup_steps", "decay_fraction", "bf16", "fp16",
                   "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "init_decoder_bias_rows",
                   "calibrate_threshold_rows", "train_decoder_bias", "unit_norm_decoder", "world_size")  # fmt: skip
# Activation arguments that only say where or how data is read, not what it is.
_READ_ONLY_FIELDS = ("activation_cache", "streaming")


def arguments_identity(*arguments, exclude: tuple[str, ...] = ()) -> dict:
    """`{"Class.field": value}` of argument dataclasses (training arguments: `TRAINING_FIELDS` only)."""
    identity = {}
    for args in arguments:
        prefix = type(args).__name__
        if isinstance(args, DMSAETrainingArguments):
            values = {name: getattr(args, name) for name in TRAINING_FIELDS}
        else:
            values = dataclasses.asdict(args)
        for name, value in values.items():
            if name not in exclude and f"{prefix}.{name}" not in exclude:
                identity[f"{prefix}.{name}"] = json.loads(json.dumps(value, default=str))
    if any(isinstance(a, ActivationArguments) for a in arguments):
        activation_args = next(a for a in arguments if isinstance(a, ActivationArguments))
        identity["ActivationArguments.cached"] = activation_args.activation_cache is not None
    return identity


class RunState:
    """`state.json` of an output folder: kind, identity, slices and records; rewritten atomically by the main
    process (`writer`), which also holds the folder's lock (`.lock`) as long as this object lives."""

    def __init__(self, output_dir: str | Path, kind: str, identity: dict, *, writer: bool):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "state.json"
        self.writer = writer
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._lock = None
        if writer:
            self._lock = FileLock(str(self.output_dir / ".lock"))
            try:
                self._lock.acquire(timeout=0)
            except Timeout:
                raise RuntimeError(f"{self.output_dir} is in use by another run (its .lock is held); wait for it to "
                                   "finish or choose another output_dir") from None  # fmt: skip
        self.data = {"kind": kind, "identity": {}, "slices": []}
        if self.path.is_file():
            self.data = read_json(self.path, {"kind": str, "identity": dict, "slices": list})
            if self.data.get("kind") != kind:
                raise ValueError(f"{self.output_dir} holds a {self.data.get('kind')} run, not a {kind} run; use another "
                                 "output_dir")  # fmt: skip
        elif any(p.name.startswith("checkpoint-") for p in self.output_dir.iterdir()):
            raise ValueError(f"{self.output_dir} holds checkpoints but no state.json: it is not this run's folder")
        self.require(identity)

    def require(self, identity: dict) -> None:
        """Check `identity` against what the run recorded (refusing any difference, naming the fields) and record
        what is new."""
        recorded = self.data["identity"]
        difference = identity_difference({k: recorded[k] for k in identity if k in recorded},
                                          {k: v for k, v in identity.items() if k in recorded})  # fmt: skip
        if difference:
            fields = "; ".join(f"{k}: recorded {old!r}, now {new!r}" for k, (old, new) in difference.items())
            raise ValueError(f"{self.output_dir} holds a {self.data['kind']} run with other settings ({fields}). Use "
                             "another output_dir, or delete it to start over.")  # fmt: skip
        recorded.update(identity)
        self.save()

    def close(self) -> None:
        """Release the folder's lock (a process's exit releases it too)."""
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None

    @property
    def slices(self) -> SliceLayout:
        return SliceLayout(self.data["slices"])

    def record(self, *keys: str) -> dict:
        """The record at `data[keys[0]][keys[1]]…`, created empty if missing."""
        node = self.data
        for key in keys:
            node = node.setdefault(key, {})
        return node

    def save(self) -> None:
        if self.writer:
            write_json_atomically(self.path, self.data)


# ---------------------------------------------------------------------------------------------------------------
# The data a run reads


def _broadcast(value, training_args: DMSAETrainingArguments):
    """`value` of the main process on every process."""
    if training_args.world_size == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


class RunData:
    """The LM, the stream statistics and the slices' data of one run. Statistics are computed by the main process
    once and kept in the run's state; caches are written by the main process while the others wait."""

    def __init__(self, args: ActivationArguments, training_args: DMSAETrainingArguments, state: RunState):
        self.args, self.training_args, self.state = args, training_args, state
        self.lm, self.tokenizer = load_language_model(args.model_name_or_path, revision=args.model_revision,
                                                      dtype=args.lm_dtype, hook_layer=args.hook_layer,
                                                      context_length=args.context_length)  # fmt: skip
        self.lm.to(training_args.device)
        self.lm_weights = weights_digest(self.lm)
        self.harvester = Harvester(args, self.lm, self.tokenizer)
        state.require(self.input_identity())
        recorded = state.data.get("statistics")
        if recorded is None:
            recorded = _broadcast(dataclasses.asdict(self.harvester.statistics) if training_args.process_index == 0
                                  else None, training_args)  # fmt: skip
            state.data["statistics"] = recorded
            state.save()
        self.harvester._statistics = StreamStatistics(**recorded)
        self.statistics = self.harvester.statistics
        self.d_in = self.harvester.d_in
        self.eval_slice = self._eval_slice()

    @property
    def norm_factor(self) -> float:
        return self.statistics.norm_factor

    def input_identity(self) -> dict:
        """What the run reads, beyond its arguments: the LM's weights and the dataset's first documents."""
        source = self.harvester.source
        identity = {"inputs.lm_weights": self.lm_weights,
                    f"inputs.dataset[{self.args.dataset_split}]": source.digest(self.args.dataset_split)}  # fmt: skip
        if self.args.eval_tokens and self.args.eval_split in source.splits():
            identity[f"inputs.dataset[{self.args.eval_split}]"] = source.digest(self.args.eval_split)
        return identity

    # -- slices -----------------------------------------------------------------------------------------------
    def fixed_slice(self, name: str, tokens: int, split: str | None = None) -> TokenSlice:
        """A slice of at least `tokens` positions of `split` (default: the training split), laid out now."""
        split = split or self.args.dataset_split
        harvester = self.harvester

        def end_of(start: StreamPosition, sequences: int) -> StreamPosition:
            return position_after(harvester.source, split, harvester.packing, start, sequences)

        piece = self.state.slices.fixed(name, split, self.args.sequences_for(tokens), end_of)
        self.state.save()
        return piece

    def training_slice(self, name: str) -> TokenSlice:
        piece = self.state.slices.training(name, self.args.dataset_split, self.args.num_tokens)
        self.state.save()
        return piece

    def _eval_slice(self) -> TokenSlice | None:
        """The held-out split from its start, or, if the dataset has none, a slice of the training stream."""
        if not self.args.eval_tokens:
            return None
        splits = self.harvester.source.splits()
        if self.args.eval_split in splits:
            return self.fixed_slice("eval", self.args.eval_tokens, self.args.eval_split)
        piece = self.fixed_slice("eval", self.args.eval_tokens)
        if self.training_args.process_index == 0:
            logger.warning("%s has no split %r: evaluation reads sequences %d–%d of its %r stream, which no run trains "
                           "on", self.args.dataset_name_or_path, self.args.eval_split, piece.start.sequence,
                           piece.end.sequence - 1, piece.split)  # fmt: skip
        return piece

    # -- caches -------------------------------------------------------------------------------------------------
    def _cache_path(self, piece: TokenSlice, identity: dict) -> Path:
        """`<activation_cache>/<slice>-<hash of identity>` (attribution pairs of a streamed run: under
        `<output_dir>/cache`)."""
        tag = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
        root = Path(self.args.activation_cache) if self.args.activation_cache else self.state.output_dir / "cache"
        return root / f"{piece.name}-{tag}"

    def cache_identity(self, piece: TokenSlice, *, gradients: bool = False, lm_batch_size: int | None = None) -> dict:
        """What a cache of `piece` holds: everything that decides its rows and their order."""
        a = self.args
        keys = ("model_name_or_path", "model_revision", "hook_layer", "hook_name", "dataset_name_or_path",
                "dataset_config_name", "text_column", "context_length", "prepend_bos", "lm_dtype", "cache_dtype",
                "harvest_seed", "shuffle_buffer_tokens", "outlier_norm_ratio")  # fmt: skip
        identity = {k: getattr(a, k) for k in keys}
        identity |= {"lm_weights": self.lm_weights, "median_norm": self.statistics.median_norm,
                     "lm_batch_size": lm_batch_size or a.lm_batch_size, "gradients": gradients,
                     "slice": {k: v for k, v in piece.to_dict().items() if k not in ("name", "end")}}  # fmt: skip
        return identity

    def _build_cache(self, cls, piece: TokenSlice, *, gradients: bool = False, lm_batch_size: int | None = None):
        """The cache of `piece` (written by the main process first, then opened by every process)."""
        identity = self.cache_identity(piece, gradients=gradients, lm_batch_size=lm_batch_size)
        path = self._cache_path(piece, identity)
        ends: list[StreamPosition] = []

        def blocks():
            total = piece.rows or piece.sequences * self.args.body_length
            progress = tqdm(total=total, desc=f"harvesting {piece.name}" + (" (with gradients)" if gradients else ""),
                            unit="tok", unit_scale=True, disable=self.training_args.process_index != 0)  # fmt: skip
            batches = self.harvester.batches(piece.split, piece.start, max_sequences=piece.sequences,
                                             with_gradient=gradients, batch_size=lm_batch_size)  # fmt: skip
            for window in shuffled_windows(_counted(batches, progress), self.args.shuffle_buffer_tokens,
                                           self.args.harvest_seed, limit=piece.rows):  # fmt: skip
                ends.append(window.end)
                yield window.tensors
            progress.close()

        with self.training_args.main_process_first(desc=f"cache {piece.name}"):
            cache = cls.build(path, identity, blocks(), piece.rows, self.args.cache_dtype,
                              extra=lambda: {"end": ends[-1].to_dict()})  # fmt: skip
        return cache

    # -- what training, evaluation and attribution read ------------------------------------------------------------
    def training_data(self, piece: TokenSlice, args: DMSAETrainingArguments):
        """The rows of a training slice: its cache, or a stream of this process's `max_steps` batches."""
        if self.args.activation_cache is not None:
            return self._build_cache(ActivationCache, piece)
        batches = args.max_steps * args.gradient_accumulation_steps
        return ActivationStream(self.harvester, piece.split, piece.start, args.per_device_train_batch_size, batches,
                                shard=(args.process_index, args.world_size), seed=self.args.harvest_seed)  # fmt: skip

    def finish_slice(self, piece: TokenSlice, dataset) -> TokenSlice:
        """Record where a training slice ended: after the last LM batch any process read for it."""
        if isinstance(dataset, ActivationStream):
            ends = [dataset.end.to_dict()]
            if self.training_args.world_size > 1:
                from accelerate.utils import gather_object

                ends = gather_object(ends)
            end = StreamPosition.from_dict(max(ends, key=lambda e: e["sequence"]))
        else:
            end = StreamPosition.from_dict(dataset.extra["end"])
        piece = self.state.slices.finish(piece.name, end)
        self.state.save()
        return piece

    def eval_dataset(self) -> ActivationCache | None:
        """Held-out activations for the Trainer's evaluation loop (cached runs only: a stream is evaluated after
        training, by `eval_batches`)."""
        if self.eval_slice is None or self.args.activation_cache is None:
            return None
        return self._build_cache(ActivationCache, self.eval_slice)

    def eval_batches(self, batch_size: int):
        """Held-out activations in batches of `batch_size` rows (cached, or harvested now)."""
        if self.eval_slice is None:
            return
        if (cache := self.eval_dataset()) is not None:
            yield from cache.batches(batch_size)
            return
        pending = None
        piece = self.eval_slice
        for harvested in self.harvester.batches(piece.split, piece.start, max_sequences=piece.sequences):
            rows = harvested.tensors["activations"]
            pending = rows if pending is None else torch.cat([pending, rows])
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                pending = pending[batch_size:]
        if pending is not None and len(pending):
            yield pending

    def eval_text_batches(self, count: int) -> list[torch.Tensor]:
        """The first `count` LM batches of the held-out slice (input ids), for CE loss recovered."""
        if self.eval_slice is None or count == 0:
            return []
        piece = self.eval_slice
        batches = sequence_batches(self.harvester.source, piece.split, self.harvester.packing, piece.start,
                                   self.args.lm_batch_size, max_sequences=piece.sequences)  # fmt: skip
        return [b.input_ids for _, b in zip(range(count), batches)]

    def attribution_pairs(self, piece: TokenSlice, lm_batch_size: int, cached: bool):
        """The `(x, g)` pairs of the attribution slice: an `AttributionCache`, or a generator of shuffled windows
        harvested now (`cached=False`)."""
        if cached:
            return self._build_cache(AttributionCache, piece, gradients=True, lm_batch_size=lm_batch_size)
        batches = self.harvester.batches(piece.split, piece.start, max_sequences=piece.sequences,
                                         with_gradient=True, batch_size=lm_batch_size)  # fmt: skip
        return (w.tensors for w in shuffled_windows(batches, self.args.shuffle_buffer_tokens, self.args.harvest_seed))

    # -- what a distillation or transfer asks of any activation source ------------------------------------------
    def sae_fields(self) -> dict:
        """The `DMSAEConfig` fields these activations decide: width, scale and where they are read."""
        return {"d_in": self.d_in, "norm_factor": self.norm_factor, "base_model": self.args.model_name_or_path,
                "hook_layer": self.args.hook_layer, "hook_name": self.args.hook_name}  # fmt: skip

    @property
    def dataset_name(self) -> str:
        return self.args.dataset_name_or_path

    def gradient_pairs(self, args: AttributionArguments) -> LMGradientPairs:
        """The attribution split's `(x, g)` pairs, `g` the gradient of the LM's next-token loss."""
        return LMGradientPairs(self, args)

    def downstream_metrics(self, model: DMSAEModel, batches: int) -> dict[str, float]:
        """CE loss recovered with `model` spliced into the LM, on the first `batches` held-out LM batches."""
        return ce_loss_recovered(model, self.lm, self.eval_text_batches(batches), self.harvester.positions())


class LMGradientPairs:
    """The `(x, g)` pairs of a run's attribution slice (text no training run reads), `g = ∂L/∂x` of the LM's
    next-token loss: harvested once into a cache, or with `cache_attribution_pairs=False` at every pass."""

    def __init__(self, data: RunData, args: AttributionArguments):
        self.data, self.args = data, args
        self.slice = data.fixed_slice("attribution", args.attribution_tokens)
        self.max_rows = self.slice.sequences * data.args.body_length
        self._cache = None
        if args.cache_attribution_pairs:
            self._cache = data.attribution_pairs(self.slice, args.attribution_batch_size, cached=True)
            self.max_rows = len(self._cache)

    def pairs(self) -> Iterable[dict[str, torch.Tensor]]:
        if self._cache is not None:
            return (self._cache.rows(i, i + 65_536) for i in range(0, len(self._cache), 65_536))
        return self.data.attribution_pairs(self.slice, self.args.attribution_batch_size, cached=False)


class ActivationSource(Protocol):
    """What a distillation or a transfer reads, whatever produces the activations: `RunData` (an LM's hook on a text
    stream) or a synthetic world (`synthetic.SyntheticSource`), with the objective whose `∂L/∂x` scores latents."""

    d_in: int
    eval_slice: object | None
    """The held-out data, or None if there is none."""

    dataset_name: str
    default_repo: str
    """Repo name stem when none is given (read from a given source; an LM run's comes from its arguments)."""

    def input_identity(self) -> dict:
        """What the run reads beyond its arguments (recorded in its state; a resumed run must read the same)."""

    def sae_fields(self) -> dict:
        """The `DMSAEConfig` fields the activations decide (`d_in`, `norm_factor`, `base_model`, hook)."""

    def training_slice(self, name: str):
        """The fresh rows a training run named `name` reads (`.name`, `.rows`), disjoint from every other slice."""

    def training_data(self, piece, args: DMSAETrainingArguments):
        """The Trainer's `train_dataset` for `piece`."""

    def finish_slice(self, piece, dataset):
        """Record that `piece` was read (by `dataset`)."""

    def eval_dataset(self):
        """The Trainer's `eval_dataset`, or None."""

    def eval_batches(self, batch_size: int) -> Iterable[torch.Tensor]:
        """Held-out activations in batches."""

    def gradient_pairs(self, args: AttributionArguments):
        """The `attribution.GradientPairs` that score latents."""

    def downstream_metrics(self, model: DMSAEModel, batches: int) -> dict[str, float]:
        """What the objective says of `model`'s reconstructions (an LM: CE loss recovered)."""


def open_source(source: ActivationSource | None, activation_args: ActivationArguments | None,
                training_args: DMSAETrainingArguments, state: RunState) -> ActivationSource:  # fmt: skip
    """`source`, its inputs recorded in (or checked against) the run's state; without one, the LM's `RunData`."""
    if source is None:
        return RunData(activation_args, training_args, state)
    state.require(source.input_identity())
    return source


def _counted(batches, progress):
    """Pass harvested batches through, counting their rows on a progress bar."""
    for batch in batches:
        progress.update(len(batch))
        yield batch


def sae_config(sae: SAEArguments, data, **overrides) -> DMSAEConfig:
    """The `DMSAEConfig` of a new SAE on the activations of `data` (a `RunData` or another source with
    `sae_fields()`); `overrides` (e.g. a core) win."""
    core_size = overrides.get("core_size", 0)
    settings = dict(
        dict_size=sae.dict_size,
        group_sizes=matryoshka_group_sizes(sae.dict_size - core_size, tuple(sae.group_fractions)),
        k=sae.k,
        k_noncore=sae.k_noncore,
        sparsity=sae.sparsity,
        aux_coef=sae.aux_coef,
        prefix_loss_weighting=sae.prefix_loss_weighting,
        train_core_bias=sae.train_core_bias,
        dead_tokens_threshold=sae.dead_tokens_threshold,
        threshold_beta=sae.threshold_beta,
        **data.sae_fields(),
    )
    return DMSAEConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Training


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


def load_trained_model(folder: str | Path) -> DMSAEModel:
    """The model `train_sae` saved in `folder`, refused if its files changed since (their checksums are written
    after them)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        raise IntegrityError(f"{folder} has no {CHECKSUMS}: its model was not saved by a finished training run")
    verify_checksums(folder, read_json(folder / CHECKSUMS, {}))
    return DMSAEModel.from_pretrained(folder)


def training_steps(rows: int, args: DMSAETrainingArguments) -> int:
    """Optimiser steps that read a slice's `rows` (its token budget) over all processes, or `max_steps` if given,
    which must fit in them: more would read rows twice from a cache, and past the slice (into the next one's tokens)
    from a stream."""
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    steps = rows // per_step
    if steps < 1:
        raise ValueError(f"num_tokens={rows} is less than one optimiser step's {per_step} rows "
                         "(per_device_train_batch_size × processes × gradient_accumulation_steps)")  # fmt: skip
    if args.max_steps > steps:
        raise ValueError(f"max_steps={args.max_steps} is invalid: the token budget num_tokens={rows} holds {steps} "
                         f"optimiser steps of {per_step} rows; raise num_tokens or lower max_steps")  # fmt: skip
    return args.max_steps if args.max_steps > 0 else steps


def train_sae(model: DMSAEModel, data: RunData, piece: TokenSlice, args: DMSAETrainingArguments,
              callbacks=None) -> DMSAETrainer:  # fmt: skip
    """Train `model` on the training slice `piece` (its step count from the slice's budget), resuming from the last
    complete checkpoint in `args.output_dir`; save the final model there and record where the slice ended."""
    args = dataclasses.replace(args, max_steps=training_steps(piece.rows, args))
    train = data.training_data(piece, args)
    trainer = DMSAETrainer(model=model, args=args, train_dataset=train, eval_dataset=data.eval_dataset(),
                           callbacks=callbacks)  # fmt: skip
    logger.info("Training process %d of %d on %s: %d steps on slice %r", args.process_index, args.world_size,
                args.device, args.max_steps, piece.name)  # fmt: skip
    checkpoint = last_complete_checkpoint(args.output_dir)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
    first_step = read_json(Path(checkpoint) / "trainer_state.json", {"global_step": int})["global_step"] if checkpoint else 0
    with stage("train") as timed:
        trainer.train(resume_from_checkpoint=checkpoint)
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        timed.tokens = (trainer.state.global_step - first_step) * rows_per_step
    trainer.save_model(args.output_dir)
    if args.should_save:
        write_json_atomically(Path(args.output_dir) / CHECKSUMS, checksums(args.output_dir, list(MODEL_FILES)))
    trainer.accelerator.wait_for_everyone()
    data.finish_slice(piece, train)
    return trainer


def end_processes() -> None:
    """The last call of a script: every process waits for the main one (which evaluates, writes and pushes alone),
    then the process group is taken down in order, so no process exits while another still talks to it."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None, shared: tuple = ()) -> tuple:
    """Parse `[config.json] [--field value …]`: the JSON file's fields, overridden by the command line. JSON fields
    of the `shared` dataclasses (other scripts' arguments in a shared config file) are skipped; unknown ones are
    an error. A list field given as `none` is empty."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)}
    skipped = {f.name for cls in shared for f in dataclasses.fields(cls)} - known
    from_file: list[str] = []
    if argv and argv[0].endswith(".json"):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        for key, value in read_json(path).items():
            if value is None or key in skipped:
                continue
            if key not in known:
                raise ValueError(f"{path}: {key!r} is not an argument of this script")
            values = value if isinstance(value, list) else [value]
            from_file += [f"--{key}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values or ["none"])]
    namespace = parser.parse_args(from_file + argv)
    parsed = []
    for cls in dataclass_types:
        values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}
        for name, value in values.items():
            if isinstance(value, list) and [str(v).lower() for v in value] == ["none"]:
                values[name] = []
        parsed.append(cls(**values))
    return tuple(parsed)
