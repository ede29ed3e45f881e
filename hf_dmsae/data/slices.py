"""Disjoint slices of a split's token stream: what each part of a run reads.

A run hands out the stream of its training split in order: first the fixed slices, whose length is a number of
sequences known before anything runs (the attribution split, and the evaluation slice when the dataset has no
held-out split), then one training slice per cycle and one for the control. A training slice takes `rows`
activation rows per reader, and ends after the last LM batch read for it (over all processes), which is only known
once it has been read; the next slice starts there. The layout lives in the run's state, so a resumed run reads the
same slices, and the report lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from .text import StreamPosition


@dataclass
class TokenSlice:
    """Sequences `start.sequence … end.sequence - 1` of `split`'s stream."""

    name: str
    split: str
    start: StreamPosition
    rows: int | None = None
    """Training slices: the rows each reader takes (its token budget)."""
    sequences: int | None = None
    """Fixed slices: their length in sequences."""
    end: StreamPosition | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "start": self.start.to_dict(),
            "rows": self.rows,
            "sequences": self.sequences,
            "end": self.end.to_dict() if self.end else None,
        }

    @classmethod
    def from_dict(cls, values: dict) -> TokenSlice:
        end = StreamPosition.from_dict(values["end"]) if values.get("end") else None
        return cls(
            values["name"],
            values["split"],
            StreamPosition.from_dict(values["start"]),
            values.get("rows"),
            values.get("sequences"),
            end,
        )

    @property
    def sequence_range(self) -> tuple[int, int | None]:
        return self.start.sequence, self.end.sequence if self.end else None


class SliceLayout:
    """The slices of a run, in allocation order, stored in `records` (a list inside the run's state)."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __iter__(self):
        return (TokenSlice.from_dict(r) for r in self.records)

    def get(self, name: str) -> TokenSlice | None:
        return next((s for s in self if s.name == name), None)

    def frontier(self, split: str) -> StreamPosition:
        """Where the next slice of `split` starts: after the last one handed out, which must have ended."""
        last = None
        for piece in self:
            if piece.split == split:
                last = piece
        if last is None:
            return StreamPosition()
        if last.end is None:
            raise RuntimeError(f"slice {last.name!r} has not ended yet: the next slice of {split!r} cannot start")
        return last.end

    def fixed(self, name: str, split: str, sequences: int, end_of) -> TokenSlice:
        """The slice `name` of `sequences` sequences, handed out now if new; `end_of(start, sequences)` finds its
        end (by tokenising)."""
        if (existing := self.get(name)) is not None:
            if existing.sequences != sequences or existing.split != split:
                raise ValueError(f"slice {name!r} was laid out as {existing.sequences} sequences of {existing.split!r}")
            return existing
        start = self.frontier(split)
        piece = TokenSlice(name, split, start, sequences=sequences, end=end_of(start, sequences))
        self.records.append(piece.to_dict())
        return piece

    def training(self, name: str, split: str, rows: int) -> TokenSlice:
        """The training slice `name` (`rows` per reader), handed out now if new; its end comes with `finish`."""
        if (existing := self.get(name)) is not None:
            if existing.rows != rows or existing.split != split:
                raise ValueError(f"slice {name!r} was laid out as {existing.rows} rows of {existing.split!r}")
            return existing
        piece = TokenSlice(name, split, self.frontier(split), rows=rows)
        self.records.append(piece.to_dict())
        return piece

    def adopt(self, piece: TokenSlice) -> TokenSlice:
        """Another run's finished slice, read by this one as it was laid out there (a transfer on a distillation's
        control slice); refused if this run laid out a slice of that name otherwise, or one it overlaps."""
        if piece.end is None:
            raise ValueError(f"slice {piece.name!r} has not ended: only a finished slice is read by another run")
        if (existing := self.get(piece.name)) is not None:
            if existing.to_dict() != piece.to_dict():
                raise ValueError(
                    f"slice {piece.name!r} was laid out here as {existing.to_dict()}, not {piece.to_dict()}"
                )
            return existing
        self.records.append(piece.to_dict())
        try:
            self.check_disjoint()
        except RuntimeError:
            self.records.pop()
            raise
        return piece

    def finish(self, name: str, end: StreamPosition) -> TokenSlice:
        """Record where slice `name` ended (the same end again is fine: a resumed reader finds it again)."""
        for record in self.records:
            if record["name"] == name:
                if record["end"] is not None and StreamPosition.from_dict(record["end"]) != end:
                    raise RuntimeError(f"slice {name!r} ended at {record['end']} before, now at {end.to_dict()}")
                record["end"] = end.to_dict()
                self.check_disjoint()
                return TokenSlice.from_dict(record)
        raise KeyError(name)

    def check_disjoint(self) -> None:
        """Raise if two slices of one split share a sequence."""
        by_split: dict[str, list[TokenSlice]] = {}
        for piece in self:
            by_split.setdefault(piece.split, []).append(piece)
        for pieces in by_split.values():
            pieces.sort(key=lambda p: p.start.sequence)
            for first, second in pairwise(pieces):
                if first.end is None or first.end.sequence > second.start.sequence:
                    raise RuntimeError(f"slices {first.name!r} and {second.name!r} overlap")
