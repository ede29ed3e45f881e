"""Stage times: each stage its own time only, tokens summed, nothing recorded without a recorder."""

import pytest

from hf_dmsae.utils import stages
from hf_dmsae.utils.stages import StageTimes, stage


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves only when told."""
    now = [0.0]
    monkeypatch.setattr(stages.time, "perf_counter", lambda: now[0])
    return now


def test_a_stage_inside_another_is_taken_out_of_it(clock):
    with StageTimes() as times:
        with stage("train") as train:
            clock[0] += 3.0
            with stage("harvest") as harvest:  # a stream harvesting during training
                clock[0] += 2.0
                harvest.tokens += 100
            with stage("attribution"):
                clock[0] += 1.0
            train.tokens = 400
        with stage("harvest") as harvest:
            clock[0] += 2.0
            harvest.tokens += 300
    summary = times.summary()
    assert summary["train"] == {"seconds": 3.0, "tokens": 400, "tokens_per_s": 133.3}
    assert summary["harvest"] == {"seconds": 4.0, "tokens": 400, "tokens_per_s": 100.0}
    assert summary["attribution"] == {"seconds": 1.0, "tokens": 0, "tokens_per_s": 0.0}


def test_stages_outside_a_recorder_are_not_recorded(clock):
    with stage("train") as train:
        clock[0] += 1.0
        train.tokens = 5
    with StageTimes() as times:
        pass
    assert times.summary() == {} and not stages._nested_seconds


def test_a_failing_stage_is_still_closed(clock):
    with StageTimes() as times, pytest.raises(RuntimeError):
        with stage("train"):
            clock[0] += 1.0
            raise RuntimeError("crash")
    assert times.summary()["train"]["seconds"] == 1.0 and not stages._nested_seconds and not stages._recorders
