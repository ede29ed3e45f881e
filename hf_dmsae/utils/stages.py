"""Where a run's time goes: wall seconds and tokens per stage (harvest, train, attribution, …). Code marks its work
with `with stage(name) as timed:` (and adds to `timed.tokens`); a `StageTimes` recorder, active around a cycle,
collects them. A stage counts only its own time: one run inside another (a stream harvesting during training, the
selection scored at the end of training) is taken out of the outer one. Without an active recorder, marking costs
nothing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Stage:
    """One stage's totals: wall seconds of its own and the tokens (activation rows) it processed."""

    seconds: float = 0.0
    tokens: int = 0


class StageTimes:
    """Collects the stages marked while it is active (`with StageTimes() as times:`; the innermost recorder)."""

    def __init__(self):
        self.stages: dict[str, Stage] = {}

    def __enter__(self) -> StageTimes:
        _recorders.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _recorders.remove(self)

    def summary(self) -> dict[str, dict[str, float]]:
        """`{stage: {"seconds", "tokens", "tokens_per_s"}}`, as a run's state records it."""
        return {
            name: {
                "seconds": round(s.seconds, 3),
                "tokens": s.tokens,
                "tokens_per_s": round(s.tokens / s.seconds, 1) if s.seconds > 0 else 0.0,
            }
            for name, s in self.stages.items()
        }


_recorders: list[StageTimes] = []
_nested_seconds: list[float] = []  # per open stage: the time of the stages inside it


@contextmanager
def stage(name: str):
    """Time the block as stage `name` of the active recorder; the block adds the tokens it processed to the
    yielded `Stage`'s `tokens`."""
    timed = Stage()
    if not _recorders:
        yield timed
        return
    recorder, start = _recorders[-1], time.perf_counter()
    _nested_seconds.append(0.0)
    try:
        yield timed
    finally:
        seconds = time.perf_counter() - start
        nested = _nested_seconds.pop()
        if _nested_seconds:
            _nested_seconds[-1] += seconds
        total = recorder.stages.setdefault(name, Stage())
        total.seconds += seconds - nested
        total.tokens += timed.tokens
