"""Activations of a causal LM at one hook point, harvested from slices of a text split's token stream.

A `Harvester` runs the LM (up to the hook, or through it with the loss gradient for attribution) over LM batches of
packed sequences and keeps the positions an SAE trains on: not special tokens (BOS, separators, padding) and not the
rare attention-sink positions of outsized norm. Which positions are outliers, and the normalisation factor, are fixed
once per run from the first rows of the stream (`StreamStatistics`), so they depend on neither the LM's batching nor
the slice being read.

Rows are mixed in shuffling windows: a window is the rows of consecutive LM batches (at least
`shuffle_buffer_tokens`), permuted by a seed of its own. `ActivationStream` serves training batches from a slice
this way, harvesting as it goes; with several processes, process r harvests LM batches r, r + W, …, so every process
reads different tokens. Windows make the stream resumable: a checkpoint records where each window began, and a
resumed run re-harvests only the window holding its next row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..utils.stages import stage
from .embedded import EMBEDDED_CORPUS, EMBEDDED_LM
from .language_model import LayerActivations
from .text import StreamPosition, TextSource, TokenPacking, sequence_batches

DTYPES = Literal["float32", "bfloat16", "float16"]


@dataclass
class ActivationArguments:
    """Where activations come from and how much of them each run reads. Parsed by `HfArgumentParser` in the
    scripts."""

    model_name_or_path: str = field(default=EMBEDDED_LM, metadata={"help": "Causal LM: Hub name, path or embedded:…"})
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the LM."})
    hook_layer: int = field(default=15, metadata={"help": "Block whose residual stream is read (0-based)."})
    hook_name: Literal["resid_post", "resid_pre"] = field(
        default="resid_post", metadata={"help": "Hook point: the block's output or its input."}
    )
    dataset_name_or_path: str = field(
        default=EMBEDDED_CORPUS,
        metadata={"help": "Text dataset: Hub name, folder (save_to_disk or data files), data file or embedded:…"},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split whose token stream the runs read."})
    eval_split: str | None = field(
        default="test",
        metadata={
            "help": "Held-out split for evaluation. If the dataset has no such split, evaluation reads a slice "
            "of the training stream that nothing trains on (logged and recorded in the run state)."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    streaming: bool | None = field(default=None, metadata={"help": "Stream the dataset (default: Hub datasets)."})
    context_length: int = field(default=128, metadata={"help": "Tokens per LM sequence (BOS included)."})
    prepend_bos: bool = field(default=True, metadata={"help": "Start every sequence with the BOS token."})
    lm_batch_size: int = field(default=16, metadata={"help": "Sequences per LM forward pass."})
    lm_dtype: DTYPES = field(default="float32", metadata={"help": "dtype the LM runs in."})
    num_tokens: int = field(
        default=500_000,
        metadata={"help": "Activation rows each training run reads: its token budget, a fresh slice of the stream."},
    )
    eval_tokens: int = field(default=32_768, metadata={"help": "Token positions of held-out text to evaluate on."})
    shuffle_buffer_tokens: int = field(
        default=131_072, metadata={"help": "Rows per shuffling window (held in memory, in the LM's dtype)."}
    )
    norm_tokens: int = field(
        default=16_384,
        metadata={"help": "First rows of the stream that fix the normalisation factor and the outlier reference."},
    )
    outlier_norm_ratio: float = field(
        default=10.0,
        metadata={
            "help": "Drop positions whose activation norm exceeds this multiple of the median norm (attention "
            "sinks next to the BOS reach 100×); 0 keeps all."
        },
    )
    activation_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of on-disk caches (every slice of the run is harvested once into it); none: "
            "activations are harvested while training."
        },
    )
    cache_dtype: DTYPES = field(default="float32", metadata={"help": "dtype of cached rows."})
    harvest_seed: int = field(default=0, metadata={"help": "Seed of the shuffling windows."})

    def __post_init__(self):
        for name in ("context_length", "lm_batch_size", "num_tokens", "shuffle_buffer_tokens", "norm_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be at least 1")
        if self.context_length < 2 + int(self.prepend_bos):
            raise ValueError(f"context_length={self.context_length} is invalid: too short to predict a token")
        if self.eval_tokens < 0:
            raise ValueError(f"eval_tokens={self.eval_tokens} is invalid: must be non-negative")
        if self.hook_layer < 0:
            raise ValueError(f"hook_layer={self.hook_layer} is invalid: must be non-negative")
        if self.outlier_norm_ratio < 0:
            raise ValueError(f"outlier_norm_ratio={self.outlier_norm_ratio} is invalid: must be non-negative")
        if self.eval_split is not None and self.eval_split == self.dataset_split:
            raise ValueError(
                f"eval_split={self.eval_split!r} is the training split: held-out text must be another "
                "split (or none, for a slice of the training stream)"
            )

    def text_source(self) -> TextSource:
        return TextSource(self.dataset_name_or_path, self.dataset_config_name, self.text_column, self.streaming)

    @property
    def body_length(self) -> int:
        """Token positions per sequence an SAE can see (the BOS is never one)."""
        return self.context_length - int(self.prepend_bos)

    def sequences_for(self, tokens: int) -> int:
        """Sequences whose positions number at least `tokens`."""
        return math.ceil(tokens / self.body_length)


@dataclass(frozen=True)
class StreamStatistics:
    """Fixed once per run from the first `norm_tokens` rows of the training stream (special tokens excluded)."""

    median_norm: float
    """Median activation norm: positions above `outlier_norm_ratio` times it are dropped everywhere."""

    norm_factor: float
    """√E‖x‖² of the rows that are kept: activations divided by it have unit mean squared norm."""


def norm_factor(rows: torch.Tensor) -> float:
    """√E‖x‖²: dividing by it gives activations of unit mean squared norm."""
    return math.sqrt(rows.double().pow(2).sum(-1).mean().item())


class TrainingPositions:
    """Which token positions an SAE sees: not special tokens, and not positions whose activation norm exceeds
    `outlier_norm_ratio` × the run's median norm."""

    def __init__(self, tokenizer, outlier_norm_ratio: float, median_norm: float | None):
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.limit = outlier_norm_ratio * median_norm if outlier_norm_ratio > 0 and median_norm else None

    def mask(self, input_ids: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        keep = ~torch.isin(input_ids, self.special.to(input_ids.device))
        if self.limit is not None:
            keep &= acts.detach().float().norm(dim=-1) <= self.limit
        return keep


@dataclass
class Harvested:
    """The kept rows of one LM batch (batch `index` of a slice), and where in the stream the batch begins and ends.
    `tensors` holds `activations` (and `gradients`), and `positions`: each row's token position in the split's
    stream (sequence × context_length + column), which identifies it."""

    index: int
    start: StreamPosition
    end: StreamPosition
    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.tensors["activations"])


class Harvester:
    """The LM read at the hook over the text source: rows of any slice of the stream of any split."""

    def __init__(self, args: ActivationArguments, lm, tokenizer, statistics: StreamStatistics | None = None):
        self.args, self.lm, self.tokenizer = args, lm, tokenizer
        self.source = args.text_source()
        self.packing = TokenPacking(tokenizer, args.context_length, args.prepend_bos)
        self.layer = LayerActivations(lm, args.hook_layer, args.hook_name)
        self.d_in = lm.config.get_text_config().hidden_size
        self._statistics = statistics

    @property
    def statistics(self) -> StreamStatistics:
        """Computed from the start of the training split on first use (or given, e.g. from a run's state)."""
        if self._statistics is None:
            unfiltered = TrainingPositions(self.tokenizer, 0.0, None)
            rows, first = [], StreamPosition()
            for batch in self._batches(self.args.dataset_split, first, unfiltered, with_gradient=False):
                rows.append(batch.tensors["activations"].float())
                if sum(map(len, rows)) >= self.args.norm_tokens:
                    break
            rows = torch.cat(rows)[: self.args.norm_tokens]
            norms = rows.norm(dim=1)
            median = float(norms.median())
            ratio = self.args.outlier_norm_ratio
            kept = rows[norms <= ratio * median] if ratio > 0 else rows
            self._statistics = StreamStatistics(median_norm=median, norm_factor=norm_factor(kept))
        return self._statistics

    def positions(self) -> TrainingPositions:
        return TrainingPositions(self.tokenizer, self.args.outlier_norm_ratio, self.statistics.median_norm)

    def batches(
        self,
        split: str,
        start: StreamPosition,
        *,
        first_batch: int = 0,
        shard: tuple[int, int] = (0, 1),
        max_sequences: int | None = None,
        with_gradient: bool = False,
        batch_size: int | None = None,
    ) -> Iterator[Harvested]:
        """Kept rows of the LM batches of a slice starting at `start` (see `text.sequence_batches`); with
        `with_gradient`, each row's loss gradient too (tensor `gradients`)."""
        return self._batches(
            split,
            start,
            self.positions(),
            with_gradient,
            first_batch=first_batch,
            shard=shard,
            max_sequences=max_sequences,
            batch_size=batch_size,
        )

    def _batches(
        self,
        split,
        start,
        positions: TrainingPositions,
        with_gradient: bool,
        *,
        first_batch=0,
        shard=(0, 1),
        max_sequences=None,
        batch_size=None,
    ) -> Iterator[Harvested]:
        batch_size = batch_size or self.args.lm_batch_size
        batches = sequence_batches(
            self.source,
            split,
            self.packing,
            start,
            batch_size,
            first_batch=first_batch,
            shard=shard,
            max_sequences=max_sequences,
        )
        while True:
            with stage("attribution pairs" if with_gradient else "harvest") as timed:  # text, tokens, the LM
                batch = next(batches, None)
                if batch is None:
                    return
                input_ids = batch.input_ids.to(self.lm.device)
                if with_gradient:
                    acts, grads = self.layer.with_gradient(input_ids)
                else:
                    with torch.inference_mode():
                        acts = self.layer(input_ids)
                keep = positions.mask(input_ids, acts)
                batch_size_now, length = input_ids.shape
                token = (batch.start.sequence + torch.arange(batch_size_now))[:, None] * length + torch.arange(length)
                tensors = {"activations": acts[keep].detach().cpu(), "positions": token[keep.cpu()]}
                if with_gradient:
                    tensors["gradients"] = grads[keep].detach().cpu()
                timed.tokens += len(tensors["activations"])
            yield Harvested(batch.index, batch.start, batch.end, tensors)


@dataclass
class Window:
    """A shuffling window: the rows of consecutive LM batches `first_batch …`, permuted."""

    index: int
    first_batch: int
    start: StreamPosition
    end: StreamPosition
    rows_before: int
    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.tensors["activations"])

    def record(self) -> dict:
        """What a resumed stream needs to harvest this window again."""
        return {
            "index": self.index,
            "first_batch": self.first_batch,
            "start": self.start.to_dict(),
            "rows_before": self.rows_before,
        }


def shuffled_windows(
    harvested: Iterator[Harvested],
    window_rows: int,
    seed: int,
    *,
    first_window: int = 0,
    rows_before: int = 0,
    limit: int | None = None,
) -> Iterator[Window]:
    """Group harvested batches into windows of at least `window_rows` rows and permute each by the generator seeded
    with `(seed, window index)`. Harvesting stops once `limit` rows (counted from the stream's start) are in: the
    last window is then smaller, so a slice reads no more LM batches than its reader needs."""
    pending: list[Harvested] = []
    index = first_window

    def emit() -> Window:
        tensors = {name: torch.cat([h.tensors[name] for h in pending]) for name in pending[0].tensors}
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        order = torch.randperm(len(tensors["activations"]), generator=generator)
        return Window(
            index,
            pending[0].index,
            pending[0].start,
            pending[-1].end,
            rows_before,
            {name: t[order] for name, t in tensors.items()},
        )

    for batch in harvested:
        pending.append(batch)
        rows = sum(map(len, pending))
        if rows >= window_rows or (limit is not None and rows_before + rows >= limit):
            window = emit()
            yield window
            index, rows_before, pending = index + 1, rows_before + len(window), []
            if limit is not None and rows_before >= limit:
                return
    if pending and sum(map(len, pending)):
        yield emit()


def collate_activations(batch) -> dict[str, torch.Tensor]:
    """DataLoader collate function: a batch gathered at once (`ActivationCache.__getitems__`), a batch the stream
    already formed, or a list of rows."""
    if torch.is_tensor(batch):
        return {"activations": batch}
    if isinstance(batch, dict):
        return batch
    return {"activations": torch.stack([item["activations"] for item in batch])}


class ActivationStream(torch.utils.data.IterableDataset):
    """Training batches of `batch_size` rows harvested on the fly from a slice of the token stream that begins at
    `start`: for token budgets too large to store. Yields exactly `num_batches` batches for this process (`shard`),
    then stops; fails with the slice's position if the text runs out first.

    `state_dict()` is what a checkpoint keeps (where each window began); `resume(state, consumed_batches)` makes
    the next iteration start at the window holding the next unread row, re-harvest it and skip the rows already
    trained on. `end` is the stream position after the last LM batch harvested.
    """

    def __init__(
        self,
        harvester: Harvester,
        split: str,
        start: StreamPosition,
        batch_size: int,
        num_batches: int,
        *,
        shard: tuple[int, int] = (0, 1),
        seed: int = 0,
        window_rows: int | None = None,
    ):
        self.harvester, self.split, self.start, self.shard = harvester, split, start, shard
        self.batch_size, self.num_batches = batch_size, num_batches
        self.seed = seed * 10_007 + shard[0]  # every process mixes its own rows
        self.window_rows = window_rows or harvester.args.shuffle_buffer_tokens
        self.d_in = harvester.d_in
        self.windows: list[dict] = []
        self.consumed_batches = 0
        self.end: StreamPosition | None = None
        self._sample = torch.empty(0, self.d_in)

    def sample(self, n: int) -> torch.Tensor:
        """The first `n` rows of the slice in text order (the same on every process), at most as many as one process
        trains on: the LM batches they come from are read for training too, so no stage reads past the slice (a
        cache's `sample` stops at its end likewise). Kept, so that the decoder bias's median and the threshold's
        calibration read them once."""
        n = min(n, self.num_batches * self.batch_size)
        if len(self._sample) < n:
            rows, count = [], 0
            for harvested in self.harvester.batches(self.split, self.start):
                rows.append(harvested.tensors["activations"])
                count += len(harvested)
                if count >= n:
                    break
            self._sample = torch.cat(rows).float()
        return self._sample[:n]

    def state_dict(self) -> dict:
        return {"windows": list(self.windows), "end": self.end.to_dict() if self.end else None}

    def resume(self, state: dict, consumed_batches: int) -> None:
        self.windows = list(state["windows"])
        self.end = StreamPosition.from_dict(state["end"]) if state.get("end") else None
        self.consumed_batches = consumed_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        consumed_rows = self.consumed_batches * self.batch_size
        restart = [w for w in self.windows if w["rows_before"] <= consumed_rows]
        if consumed_rows and restart:
            window = restart[-1]
            self.windows = [w for w in self.windows if w["index"] < window["index"]]
            start, first_batch = StreamPosition.from_dict(window["start"]), window["first_batch"]
            first_window, rows_before = window["index"], window["rows_before"]
        else:
            self.windows, start, first_batch, first_window, rows_before = [], self.start, 0, 0, 0
        skip = consumed_rows - rows_before
        harvested = self.harvester.batches(self.split, start, first_batch=first_batch, shard=self.shard)
        pending, emitted = None, self.consumed_batches
        progress = tqdm(
            total=self.num_batches,
            initial=emitted,
            desc="streamed batches",
            disable=self.shard[0] != 0,
            unit="batch",
            leave=False,
        )
        for window in shuffled_windows(
            harvested,
            self.window_rows,
            self.seed,
            first_window=first_window,
            rows_before=rows_before,
            limit=self.num_batches * self.batch_size,
        ):
            self.windows.append(window.record())
            self.end = window.end
            rows = window.tensors["activations"][skip:]
            skip = 0
            pending = rows if pending is None else torch.cat([pending, rows])
            while len(pending) >= self.batch_size and emitted < self.num_batches:
                batch, pending = pending[: self.batch_size], pending[self.batch_size :]
                emitted += 1
                progress.update()
                yield {"activations": batch}
            if emitted >= self.num_batches:
                progress.close()
                return
        progress.close()
        raise ValueError(
            f"{self.harvester.source.name} ({self.split}) ran out after {emitted} of this process's {self.num_batches} "
            f"batches (slice from sequence {self.start.sequence}): lower num_tokens or use a longer split"
        )
