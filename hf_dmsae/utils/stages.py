"""Where a run's time and memory go: wall seconds, tokens and peak resident memory per stage (harvest, train,
attribution, …). Code marks its work with `with stage(name) as timed:` (and adds to `timed.tokens`); a `StageTimes`
recorder, active around a cycle, collects them. A stage counts only its own time and peak: one run inside another (a
stream harvesting during training, the selection scored at the end of training) is taken out of the outer one.
Without an active recorder, marking costs nothing.

The peak is Linux's high-water mark of the process's resident set (`VmHWM`), reset at each stage's bounds through
`/proc/self/clear_refs`; elsewhere no peak is recorded. The reset is the kernel's own, so a recorded process's
`getrusage` maximum then covers only what followed the last stage."""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Stage:
    """One stage's totals: wall seconds of its own and the tokens (activation rows) it processed."""

    seconds: float = 0.0
    tokens: int = 0
    peak_rss_mb: float | None = None


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
                **({"peak_rss_mb": round(s.peak_rss_mb, 1)} if s.peak_rss_mb is not None else {}),
            }
            for name, s in self.stages.items()
        }


_recorders: list[StageTimes] = []
_nested_seconds: list[float] = []  # per open stage: the time of the stages inside it
_open_peaks: list[float | None] = []  # per open stage: its peak resident set so far, outside the stages inside it


def resident_peak_mb() -> float | None:
    """The process's resident-set high-water mark since the last `reset_resident_peak` (None off Linux)."""
    try:
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def reset_resident_peak() -> None:
    """Restart the high-water mark from the current resident set (a no-op where the kernel does not offer it)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _higher(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


@contextmanager
def stage(name: str):
    """Time the block as stage `name` of the active recorder; the block adds the tokens it processed to the
    yielded `Stage`'s `tokens`."""
    timed = Stage()
    if not _recorders:
        yield timed
        return
    if _open_peaks:  # the enclosing stage's peak so far is its own
        _open_peaks[-1] = _higher(_open_peaks[-1], resident_peak_mb())
    reset_resident_peak()
    recorder, start = _recorders[-1], time.perf_counter()
    _nested_seconds.append(0.0)
    _open_peaks.append(None)
    try:
        yield timed
    finally:
        seconds = time.perf_counter() - start
        nested = _nested_seconds.pop()
        peak = _higher(_open_peaks.pop(), resident_peak_mb())
        reset_resident_peak()
        if _nested_seconds:
            _nested_seconds[-1] += seconds
        total = recorder.stages.setdefault(name, Stage())
        total.seconds += seconds - nested
        total.tokens += timed.tokens
        total.peak_rss_mb = _higher(total.peak_rss_mb, peak)
