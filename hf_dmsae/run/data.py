"""What a run reads: `RunData`, the LM and the activations (its stream statistics, fixed once, and for each slice
a cache on disk or a stream harvested while training), `LMGradientPairs`, the attribution split's `(x, g)` pairs, and
`ActivationSource`, what a distillation or transfer asks of any source of activations."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ..data.activations import ActivationArguments, ActivationStream, Harvester, StreamStatistics, shuffled_windows
from ..data.cache import ActivationCache, AttributionCache
from ..data.language_model import load_language_model, weights_digest
from ..data.objective import ObjectiveBatch
from ..data.slices import TokenSlice
from ..data.text import StreamPosition, position_after, sequence_batches
from ..evaluation.held_out import ce_loss_recovered
from ..model.modeling_dmsae import DMSAEModel
from .state import RunState
from .trainer import DMSAETrainingArguments

logger = logging.getLogger(__name__)


def _broadcast(value, training_args: DMSAETrainingArguments):
    """`value` of the main process on every process."""
    if training_args.world_size == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


class PairArguments(Protocol):
    """What the gradient pairs read of the attribution's arguments (`method.attribution.AttributionArguments`)."""

    attribution_tokens: int
    attribution_batch_size: int
    cache_attribution_pairs: bool
    scorer_tokens: int


class RunData:
    """The LM, the stream statistics and the slices' data of one run. Statistics are computed by the main process
    once and kept in the run's state; caches are written by the main process while the others wait."""

    def __init__(self, args: ActivationArguments, training_args: DMSAETrainingArguments, state: RunState):
        if training_args.num_train_epochs > 1 and args.activation_cache is None:
            raise ValueError(
                f"num_train_epochs={training_args.num_train_epochs:g} is invalid for a streamed run: a stream reads "
                "each training row once, as it harvests it; give --activation_cache to read a cached slice again"
            )
        self.args, self.training_args, self.state = args, training_args, state
        self.lm, self.tokenizer = load_language_model(
            args.model_name_or_path,
            revision=args.model_revision,
            dtype=args.lm_dtype,
            hook_layer=args.hook_layer,
            context_length=args.context_length,
        )
        self.lm.to(training_args.device)
        self.lm_weights = weights_digest(self.lm)
        self.harvester = Harvester(args, self.lm, self.tokenizer)
        state.require(self.input_identity())
        recorded = state.data.get("statistics")
        if recorded is None:
            recorded = _broadcast(
                dataclasses.asdict(self.harvester.statistics) if training_args.process_index == 0 else None,
                training_args,
            )
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
        identity = {
            "inputs.lm_weights": self.lm_weights,
            f"inputs.dataset[{self.args.dataset_split}]": source.digest(self.args.dataset_split),
        }
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

    def training_slice(self, name: str, tokens: int | None = None) -> TokenSlice:
        """The training slice `name` of `tokens` rows (default: the run's budget, `num_tokens`), after the last."""
        piece = self.state.slices.training(name, self.args.dataset_split, tokens or self.args.num_tokens)
        self.state.save()
        return piece

    def adopted_slice(self, piece: TokenSlice) -> TokenSlice:
        """Another run's finished training slice, read by this run as it was laid out there (`SliceLayout.adopt`):
        its cache, where `activation_cache` is the other run's, is the same."""
        piece = self.state.slices.adopt(piece)
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
            logger.warning(
                "%s has no split %r: evaluation reads sequences %d–%d of its %r stream, which no run trains on",
                self.args.dataset_name_or_path,
                self.args.eval_split,
                piece.start.sequence,
                piece.end.sequence - 1,
                piece.split,
            )
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
        keys = (
            "model_name_or_path",
            "model_revision",
            "hook_layer",
            "hook_name",
            "dataset_name_or_path",
            "dataset_config_name",
            "text_column",
            "context_length",
            "prepend_bos",
            "lm_dtype",
            "cache_dtype",
            "harvest_seed",
            "shuffle_buffer_tokens",
            "outlier_norm_ratio",
        )
        identity = {k: getattr(a, k) for k in keys}
        identity |= {
            "lm_weights": self.lm_weights,
            "median_norm": self.statistics.median_norm,
            "lm_batch_size": lm_batch_size or a.lm_batch_size,
            "gradients": gradients,
            "slice": {k: v for k, v in piece.to_dict().items() if k not in ("name", "end")},
        }
        return identity

    def _build_cache(self, cls, piece: TokenSlice, *, gradients: bool = False, lm_batch_size: int | None = None):
        """The cache of `piece` (written by the main process first, then opened by every process)."""
        identity = self.cache_identity(piece, gradients=gradients, lm_batch_size=lm_batch_size)
        path = self._cache_path(piece, identity)
        ends: list[StreamPosition] = []

        def blocks():
            total = piece.rows or piece.sequences * self.args.body_length
            progress = tqdm(
                total=total,
                desc=f"harvesting {piece.name}" + (" (with gradients)" if gradients else ""),
                unit="tok",
                unit_scale=True,
                disable=self.training_args.process_index != 0,
            )
            batches = self.harvester.batches(
                piece.split,
                piece.start,
                max_sequences=piece.sequences,
                with_gradient=gradients,
                batch_size=lm_batch_size,
            )
            for window in shuffled_windows(
                _counted(batches, progress), self.args.shuffle_buffer_tokens, self.args.harvest_seed, limit=piece.rows
            ):
                ends.append(window.end)
                yield window.tensors
            progress.close()

        with self.training_args.main_process_first(desc=f"cache {piece.name}"):
            cache = cls.build(
                path, identity, blocks(), piece.rows, self.args.cache_dtype, extra=lambda: {"end": ends[-1].to_dict()}
            )
        return cache

    # -- what training, evaluation and attribution read ------------------------------------------------------------
    def training_data(self, piece: TokenSlice, args: DMSAETrainingArguments):
        """The rows of a training slice: its cache, or a stream of this process's `max_steps` batches."""
        if self.args.activation_cache is not None:
            return self._build_cache(ActivationCache, piece)
        batches = args.max_steps * args.gradient_accumulation_steps
        return ActivationStream(
            self.harvester,
            piece.split,
            piece.start,
            args.per_device_train_batch_size,
            batches,
            shard=(args.process_index, args.world_size),
            seed=self.args.harvest_seed,
        )

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
        batches = sequence_batches(
            self.harvester.source,
            piece.split,
            self.harvester.packing,
            piece.start,
            self.args.lm_batch_size,
            max_sequences=piece.sequences,
        )
        return [b.input_ids for b in islice(batches, count)]

    def attribution_pairs(self, piece: TokenSlice, lm_batch_size: int, cached: bool):
        """The `(x, g)` pairs of the attribution slice: an `AttributionCache`, or a generator of shuffled windows
        harvested now (`cached=False`)."""
        if cached:
            return self._build_cache(AttributionCache, piece, gradients=True, lm_batch_size=lm_batch_size)
        batches = self.harvester.batches(
            piece.split, piece.start, max_sequences=piece.sequences, with_gradient=True, batch_size=lm_batch_size
        )
        return (w.tensors for w in shuffled_windows(batches, self.args.shuffle_buffer_tokens, self.args.harvest_seed))

    # -- what a distillation or transfer asks of any activation source ------------------------------------------
    def sae_fields(self) -> dict:
        """The `DMSAEConfig` fields these activations decide: width, scale and where they are read."""
        return {
            "d_in": self.d_in,
            "norm_factor": self.norm_factor,
            "base_model": self.args.model_name_or_path,
            "hook_layer": self.args.hook_layer,
            "hook_name": self.args.hook_name,
        }

    @property
    def dataset_name(self) -> str:
        return self.args.dataset_name_or_path

    def gradient_pairs(self, args: PairArguments) -> LMGradientPairs:
        """The attribution split's `(x, g)` pairs, `g` the gradient of the LM's next-token loss."""
        return LMGradientPairs(self, args)

    def objective(self, args: PairArguments, batch_size: int) -> LMObjective:
        """The LM's next-token loss on the attribution split's sequences."""
        return LMObjective(self, args, batch_size)

    def downstream_metrics(self, model: DMSAEModel, batches: int) -> dict[str, float]:
        """CE loss recovered with `model` spliced into the LM, on the first `batches` held-out LM batches (none: no
        CE metrics)."""
        if batches == 0:
            return {}
        return ce_loss_recovered(model, self.lm, self.eval_text_batches(batches), self.harvester.positions())


class LMGradientPairs:
    """The `(x, g)` pairs of a run's attribution slice (text no training run reads), `g = ∂L/∂x` of the LM's
    next-token loss: harvested once into a cache, or with `cache_attribution_pairs=False` at every pass."""

    def __init__(self, data: RunData, args: PairArguments):
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


class LMObjective:
    """The LM's next-token loss on the first `scorer_tokens` positions of the attribution slice (all with 0), as
    whole sequences, about `batch_size` positions a batch (`data.objective.Objective`, for the ablation and
    integrated-gradients scorers). Their activations are read once."""

    def __init__(self, data: RunData, args: PairArguments, batch_size: int):
        self.layer = data.harvester.layer
        piece = data.fixed_slice("attribution", args.attribution_tokens)
        sequences = min(piece.sequences, data.args.sequences_for(args.scorer_tokens or args.attribution_tokens))
        harvester, positions = data.harvester, data.harvester.positions()
        per_batch = max(1, batch_size // data.args.context_length)
        self._batches = []
        for batch in sequence_batches(
            harvester.source, piece.split, harvester.packing, piece.start, per_batch, max_sequences=sequences
        ):
            input_ids = batch.input_ids.to(data.lm.device)
            with torch.no_grad():
                acts = self.layer(input_ids)
            self._batches.append(ObjectiveBatch(acts, positions.mask(input_ids, acts), input_ids))
        self.max_rows = sum(int(b.keep.sum()) for b in self._batches)

    def batches(self) -> list[ObjectiveBatch]:
        return self._batches

    def losses(self, batch: ObjectiveBatch, activations: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.layer.patched_loss(batch.context, lambda hidden: activations.to(hidden.dtype), True)

    def gradients(self, batch: ObjectiveBatch, activations: torch.Tensor) -> torch.Tensor:
        return self.layer.with_gradient(batch.context, lambda hidden: activations.to(hidden.dtype))[1]


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

    def gradient_pairs(self, args: PairArguments):
        """The `attribution.GradientPairs` that score latents."""

    def objective(self, args: PairArguments, batch_size: int):
        """The `scorers.Objective` that ablation and integrated gradients score latents on."""

    def downstream_metrics(self, model: DMSAEModel, batches: int) -> dict[str, float]:
        """What the objective says of `model`'s reconstructions (an LM: CE loss recovered)."""


def open_source(
    source: ActivationSource | None,
    activation_args: ActivationArguments | None,
    training_args: DMSAETrainingArguments,
    state: RunState,
) -> ActivationSource:
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
