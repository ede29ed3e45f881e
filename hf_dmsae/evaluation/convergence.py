"""Whether an SAE trained (docs/method.md §7): how many of its latents still point where they were initialised, how
many died, whether its held-out FVU was still falling before the learning rate decayed (a decay lowers the loss
whether or not a model has converged), and whether it fits its training rows better than held-out ones.

`convergence_record` turns what a run measured (`run.convergence.ConvergenceCallback`) into the `convergence` object
every trained model's record holds, `converged` judged against `CRITERIA`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CRITERIA = {"share_near_init": 0.10, "dead_fraction": 0.05, "fvu_gain_last_fifth": 0.02, "overfit_gap": 0.01}
"""A model has converged when each of these is below its bound: the share of latents within `NEAR_INIT_COS` of
their initial decoder direction, the share that did not fire over a pass (`DEAD_OVER_A_PASS`), the relative
held-out FVU gain over the last fifth of training before the decay, and held-out minus training FVU."""
NEAR_INIT_COS = 0.9
INIT_SAMPLE = 4096
"""Latents whose initial decoder rows a run keeps (all of a smaller dictionary; a fixed sample of a larger one)."""
LAST_FIFTH = 0.2


def init_sample(num_latents: int, sample: int = INIT_SAMPLE) -> torch.Tensor:
    """The latents whose movement is measured: all, or the same `sample` of them for every run of this width."""
    if num_latents <= sample:
        return torch.arange(num_latents)
    return torch.randperm(num_latents, generator=torch.Generator().manual_seed(0))[:sample].sort().values


def share_near_init(initial: torch.Tensor, decoder: torch.Tensor) -> float:
    """The share of rows of `decoder` (latents' directions) within cosine `NEAR_INIT_COS` of the same rows of
    `initial`."""
    cosines = F.cosine_similarity(initial.float(), decoder.float(), dim=1)
    return float((cosines >= NEAR_INIT_COS).float().mean())


def last_fifth_before_decay(steps: int, decay_fraction: float) -> tuple[int, int]:
    """The steps that bound the last fifth of training before the learning rate's final decay."""
    end = round(steps * (1 - decay_fraction))
    return max(0, end - round(steps * LAST_FIFTH)), end


def measured_steps(steps: int, decay_fraction: float, points: int = 10) -> list[int]:
    """Where a run measures itself: `points` even fractions of training and the bounds of the last fifth."""
    marks = {round(steps * i / points) for i in range(1, points + 1)} | set(
        last_fifth_before_decay(steps, decay_fraction)
    )
    return sorted(s for s in marks if s >= 1)


def convergence_record(
    curve: list[dict],
    *,
    steps: int,
    tokens: int,
    epochs: int,
    decay_fraction: float,
    dead_fraction: dict,
    resampled_latents: int = 0,
) -> dict:
    """The `convergence` object of a model from its measurements `curve` (one `{"step", "heldout_fvu",
    "train_fvu", "share_near_init"}` per measured step, the last at `steps`); `dead_fraction` holds the shares of
    dead latents by each counting (`judged`). `resampled_latents` counts the dead latents training restarted
    (`run.resampling`): a restarted latent's decoder row is no longer near its first initialisation, so the dead
    fraction, not the share near init, says whether it trained after."""
    at = {point["step"]: point for point in curve}
    start, end = last_fifth_before_decay(steps, decay_fraction)
    before, after = (at.get(step, {}).get("heldout_fvu") for step in (start, end))
    gain = None if start < 1 or start >= end or not before or after is None else (before - after) / before
    last = at.get(steps, {})
    record = {
        "steps": steps,
        "tokens": tokens,
        "epochs": epochs,
        "heldout_fvu": last.get("heldout_fvu"),
        "train_fvu": last.get("train_fvu"),
        "fvu_gain_last_fifth": gain,
        "share_near_init": last.get("share_near_init"),
        "dead_fraction_by": dead_fraction,
        "resampled_latents": resampled_latents,
        "overfit_gap": None
        if last.get("heldout_fvu") is None or last.get("train_fvu") is None
        else last["heldout_fvu"] - last["train_fvu"],
        "curve": curve,
    }
    return judged(record)


DEAD_OVER_A_PASS = ("in_training", "in_inference")
"""The countings of dead latents a record's `dead_fraction` is the largest of, each over a window of a pass: not
fired in training over the last pass (all of training for one pass), and firing on none of the slice's rows in
inference mode at the end (a latent that fired early in a one-pass run and died since, or one that only BatchTopK
lets fire). Other countings (a record's `on_rows`: fired on none of the 8192 rows it was measured on, a window of
4% of a 200k-token pass) are kept beside them but do not count."""


def judged(record: dict) -> dict:
    """`record` with its `dead_fraction` (the largest of `DEAD_OVER_A_PASS` counted) and its verdict against
    `CRITERIA`: `converged` and the `unmet` criteria."""
    counted = [record["dead_fraction_by"].get(name) for name in DEAD_OVER_A_PASS]
    record = {**record, "dead_fraction": max((v for v in counted if v is not None), default=None)}
    unmet = [name for name, bound in CRITERIA.items() if record[name] is None or not record[name] < bound]
    return {**record, "converged": not unmet, "unmet": unmet, "criteria": dict(CRITERIA)}
