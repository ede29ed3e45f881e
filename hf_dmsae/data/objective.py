"""The downstream loss attribution scores latents against, as each activation source provides it: an LM's next-token
loss (`run.data.LMObjective`) or a synthetic task's (`studies.synthetic_world.TaskObjective`); `method.scorers`
reads it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class ObjectiveBatch:
    """Sequences the downstream loss is measured on: raw activations at the hook `[B, T, d]`, which positions are
    scored (`keep`, `[B, T]`: those a training run reads), and what the loss needs besides (`context`: an LM's input
    ids, a synthetic task's labels)."""

    activations: torch.Tensor
    keep: torch.Tensor
    context: Any


class Objective(Protocol):
    """The downstream loss with the activations at the hook replaced, on the attribution split's sequences (an LM's
    next-token loss: `run.data.LMObjective`; a synthetic task: `studies.synthetic_world.TaskObjective`)."""

    max_rows: int
    """Scored positions over all batches."""

    def batches(self) -> Iterable[ObjectiveBatch]:
        """The same batches in the same order at every call."""

    def losses(self, batch: ObjectiveBatch, activations: torch.Tensor) -> torch.Tensor:
        """Each position's loss `[B, T]` with `activations` in place of the batch's."""

    def gradients(self, batch: ObjectiveBatch, activations: torch.Tensor) -> torch.Tensor:
        """`∂L/∂x` `[B, T, d]` at `activations`, `L` the batch's summed loss."""
