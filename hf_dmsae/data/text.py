"""Text for activations: a dataset split read as documents, packed into sequences of `context_length` tokens, with
every sequence's place in the stream recorded, so that disjoint slices of the stream can be handed out and a reader
can start (or resume) at any recorded place without reading what comes before it token by token.

A `TextSource` is the embedded corpus, a Hub dataset (streamed), a folder saved by `datasets` (`save_to_disk`), a
folder of data files, or a single data file (`.jsonl`, `.json`, `.csv`, `.parquet`, `.txt`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .embedded import EMBEDDED_CORPUS, is_embedded, wiki_summaries

DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def batched(items: Iterable, size: int) -> Iterator[tuple]:
    """Consecutive tuples of `size` items (the last may be shorter); `itertools.batched` before Python 3.12."""
    iterator = iter(items)
    while batch := tuple(itertools.islice(iterator, size)):
        yield batch


@functools.cache
def _hub_splits(name: str, config_name: str | None) -> list[str]:
    from datasets import get_dataset_split_names

    return list(get_dataset_split_names(name, config_name))


@dataclass
class TextSource:
    """A text dataset and the column holding its documents."""

    name: str
    config_name: str | None = None
    column: str = "text"
    streaming: bool | None = None
    """Stream the split (default: for Hub datasets; local data is read)."""

    @property
    def _path(self) -> Path | None:
        path = Path(self.name)
        return path if not is_embedded(self.name) and path.exists() else None

    def _check_exists(self) -> None:
        looks_local = (
            self.name.startswith((".", "/", "~"))
            or self.name.count("/") > 1
            or Path(self.name).suffix in DATA_FILE_BUILDERS
        )
        if self._path is None and not is_embedded(self.name) and looks_local:
            raise FileNotFoundError(f"dataset_name_or_path={self.name!r}: no such local folder or data file")

    def splits(self) -> list[str]:
        """The split names the dataset offers."""
        from datasets import load_from_disk

        self._check_exists()
        path = self._path
        if is_embedded(self.name):
            if self.name != EMBEDDED_CORPUS:
                raise ValueError(f"Unknown embedded dataset {self.name!r}; the embedded corpus is {EMBEDDED_CORPUS!r}")
            return ["train", "test"]
        if path is not None and (path / "dataset_dict.json").is_file():
            return list(load_from_disk(str(path)).keys())
        if path is not None and ((path / "state.json").is_file() or path.is_file()):
            return ["train"]  # a single saved Dataset or data file is one split
        return _hub_splits(self.name, self.config_name)

    def load(self, split: str):
        """The split as a `datasets.Dataset` (local, read) or `IterableDataset` (streamed)."""
        from datasets import load_dataset, load_from_disk

        splits = self.splits()
        if split not in splits:
            raise ValueError(f"{self.name} has no split {split!r}; its splits are {splits}")
        path = self._path
        if is_embedded(self.name):
            data = wiki_summaries()[split]
        elif path is not None and (path / "dataset_dict.json").is_file():
            data = load_from_disk(str(path))[split]
        elif path is not None and (path / "state.json").is_file():
            data = load_from_disk(str(path))
        else:
            streaming = self.streaming if self.streaming is not None else path is None
            if path is not None and path.is_file():
                if path.suffix not in DATA_FILE_BUILDERS:
                    raise ValueError(f"{path}: unknown data file type; use one of {sorted(DATA_FILE_BUILDERS)}")
                return load_dataset(
                    DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split=split, streaming=streaming
                )
            return load_dataset(self.name, self.config_name, split=split, streaming=streaming)
        return data.to_iterable_dataset() if self.streaming else data

    def documents(self, split: str, start: int = 0) -> Iterator[str]:
        """The documents of `split` from the `start`-th on (skipped by the dataset, not tokenised)."""
        data = self.load(split)
        if start:
            data = data.skip(start)
        columns = data.column_names
        if columns is not None and self.column not in columns:
            raise ValueError(f"text_column={self.column!r} is not a column of {self.name} ({split}): it has {columns}")
        for row in data:
            if self.column not in row:
                raise ValueError(
                    f"text_column={self.column!r} is not a column of {self.name} ({split}): it has {sorted(row)}"
                )
            yield row[self.column] or ""

    def digest(self, split: str, documents: int = 32) -> str:
        """A short hash of the first documents of `split`: part of a run's identity (a changed dataset is noticed)."""
        texts = itertools.islice(self.documents(split), documents)
        return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StreamPosition:
    """A place in the packed token stream of a split: the next sequence is number `sequence`, and its first token
    after the BOS is token `offset` of document `document` (a document's tokens end with the EOS separator)."""

    sequence: int = 0
    document: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> StreamPosition:
        return cls(**values)


@dataclass(frozen=True)
class TokenPacking:
    """How documents become sequences: each followed by the EOS token, concatenated, cut into `context_length`
    tokens, each sequence starting with the BOS token if `prepend_bos`."""

    tokenizer: object
    context_length: int
    prepend_bos: bool = True

    def __post_init__(self):
        # Every budget (`ActivationArguments.body_length`) reserves the BOS's position: a tokenizer without one must
        # be told so, or sequences would hold a token more than every slice and cache counts.
        if self.prepend_bos and self.tokenizer.bos_token_id is None:
            raise ValueError(
                f"the tokenizer of {getattr(self.tokenizer, 'name_or_path', 'this LM')!r} has no BOS "
                "token: set prepend_bos false (every position of a sequence is then an SAE's)"
            )

    def sequences(
        self, documents: Iterable[str], start: StreamPosition = StreamPosition()
    ) -> Iterator[tuple[list[int], StreamPosition]]:
        """`(token ids, position of the next sequence)` for each sequence, `documents` starting at
        `start.document` (the caller skips the ones before)."""
        tokenizer = self.tokenizer
        bos = [tokenizer.bos_token_id] if self.prepend_bos else []
        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        body = self.context_length - len(bos)
        pending: list[int] = []
        head = 0  # pending[head:] are the tokens not yet emitted
        segments: list[list[int]] = []  # [document, offset of its first pending token, tokens pending], in order
        document, sequence = start.document, start.sequence
        for texts in batched(documents, 64):
            for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
                first = start.offset if document == start.document else 0
                tokens = (ids + separator)[first:]
                if tokens:
                    pending.extend(tokens)
                    segments.append([document, first, len(tokens)])
                document += 1
                while len(pending) - head >= body:
                    out = bos + pending[head : head + body]
                    head += body
                    need = body
                    while need:
                        taken = min(need, segments[0][2])
                        segments[0][1] += taken
                        segments[0][2] -= taken
                        need -= taken
                        if segments[0][2] == 0:
                            segments.pop(0)
                    sequence += 1
                    if segments:
                        position = StreamPosition(sequence, segments[0][0], segments[0][1])
                    else:
                        position = StreamPosition(sequence, document, 0)
                    yield out, position
                if head > 65_536:
                    del pending[:head]
                    head = 0


@dataclass
class SequenceBatch:
    """One LM batch of the stream: batch number `index` (counted from a slice's start), its `input_ids`
    `[B, context_length]`, and the stream positions of its first sequence and right after its last."""

    index: int
    input_ids: torch.Tensor
    start: StreamPosition
    end: StreamPosition


def sequence_batches(
    source: TextSource,
    split: str,
    packing: TokenPacking,
    start: StreamPosition,
    batch_size: int,
    *,
    first_batch: int = 0,
    shard: tuple[int, int] = (0, 1),
    max_sequences: int | None = None,
) -> Iterator[SequenceBatch]:
    """LM batches of `batch_size` sequences from `start` (the first sequence of batch `first_batch`); batch `b` goes
    to process `b % world` of `shard = (rank, world)`, the others are tokenised and passed over. With
    `max_sequences`, the stream ends after that many sequences counted from batch 0 of the slice."""
    rank, world = shard
    sequences = packing.sequences(source.documents(split, start.document), start)
    if max_sequences is not None:
        sequences = itertools.islice(sequences, max(0, max_sequences - first_batch * batch_size))
    previous_end = start
    for index, group in enumerate(batched(sequences, batch_size), start=first_batch):
        if index % world == rank:
            input_ids = torch.tensor([ids for ids, _ in group], dtype=torch.long)
            yield SequenceBatch(index, input_ids, previous_end, group[-1][1])
        previous_end = group[-1][1]


def position_after(
    source: TextSource, split: str, packing: TokenPacking, start: StreamPosition, sequences: int
) -> StreamPosition:
    """The stream position `sequences` sequences after `start` (tokenising only); fails if the split is shorter."""
    if sequences == 0:
        return start
    position = None
    for count, (_, position) in enumerate(packing.sequences(source.documents(split, start.document), start), 1):
        if count == sequences:
            return position
    raise ValueError(
        f"{source.name} ({split}) ends {sequences - (position.sequence - start.sequence if position else 0)}"
        f" sequences short of the {sequences} asked from sequence {start.sequence}"
    )
