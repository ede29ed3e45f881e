"""Stage times and peaks: each stage its own time and peak only, tokens summed, nothing recorded without a
recorder."""

import sys

import pytest
import torch

from hf_dmsae.utils import stages
from hf_dmsae.utils.stages import StageTimes, stage


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves only when told."""
    now = [0.0]
    monkeypatch.setattr(stages.time, "perf_counter", lambda: now[0])
    return now


@pytest.fixture
def memory(monkeypatch):
    """A resident set that moves only when told, with a high-water mark reset as the kernel's is."""
    state = {"now": 100.0, "peak": 100.0}

    def reset():
        state["peak"] = state["now"]

    monkeypatch.setattr(stages, "resident_peak_mb", lambda: state["peak"])
    monkeypatch.setattr(stages, "reset_resident_peak", reset)
    return state


def use(memory, mb):
    memory["now"] = mb
    memory["peak"] = max(memory["peak"], mb)


def test_a_stage_inside_another_is_taken_out_of_it(clock, memory):
    with StageTimes() as times:
        with stage("train") as train:
            clock[0] += 3.0
            use(memory, 500.0)
            with stage("harvest") as harvest:  # a stream harvesting during training
                clock[0] += 2.0
                use(memory, 900.0)
                harvest.tokens += 100
                use(memory, 300.0)
            with stage("attribution"):
                clock[0] += 1.0
            use(memory, 200.0)
            train.tokens = 400
        with stage("harvest") as harvest:
            clock[0] += 2.0
            harvest.tokens += 300
    summary = times.summary()
    assert summary["train"] == {"seconds": 3.0, "tokens": 400, "tokens_per_s": 133.3, "peak_rss_mb": 500.0}
    assert summary["harvest"] == {"seconds": 4.0, "tokens": 400, "tokens_per_s": 100.0, "peak_rss_mb": 900.0}
    assert summary["attribution"] == {"seconds": 1.0, "tokens": 0, "tokens_per_s": 0.0, "peak_rss_mb": 300.0}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak is Linux's VmHWM")
def test_a_stages_peak_is_the_resident_memory_it_touched():
    with StageTimes() as times:
        with stage("small"):
            torch.ones(1)
        with stage("large"):
            torch.ones(2**26).sum()  # 256 MB, touched, then freed
    summary = times.summary()
    assert summary["large"]["peak_rss_mb"] > summary["small"]["peak_rss_mb"] + 200


def test_stages_outside_a_recorder_are_not_recorded(clock):
    with stage("train") as train:
        clock[0] += 1.0
        train.tokens = 5
    with StageTimes() as times:
        pass
    assert times.summary() == {} and not stages._nested_seconds


def test_a_failing_stage_is_still_closed(clock, memory):
    with StageTimes() as times, pytest.raises(RuntimeError):
        with stage("train"):
            clock[0] += 1.0
            raise RuntimeError("crash")
    assert times.summary()["train"]["seconds"] == 1.0
    assert not stages._nested_seconds and not stages._open_peaks and not stages._recorders
