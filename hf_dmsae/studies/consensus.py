"""A consensus core, the paper's open question 2 ("useful latents can likely be identified more efficiently than via
multi-cycle distillation"): the cycle-0 cores of several seeds, latents matched across seeds by decoder direction,
kept where most seeds selected them. It costs one cycle-0 training per seed, as a distillation costs one training
per cycle."""

from __future__ import annotations

import torch

from ..evaluation.consistency import cosines


def consensus_members(decoders: list[torch.Tensor], match_cos: float, min_seeds: int) -> list[int]:
    """Rows of `decoders[0]` (the reference seed's selected latents' decoder directions; the others, the other seeds'
    selected latents') selected in at least `min_seeds` seeds, itself included: a row counts another seed when one of
    that seed's rows lies at cosine ≥ `match_cos` (signed, as `consistency.match_share`)."""
    if not 1 <= min_seeds <= len(decoders):
        raise ValueError(f"min_seeds={min_seeds} is invalid: must lie in [1, {len(decoders)} seeds]")
    reference = decoders[0]
    counts = torch.ones(len(reference), dtype=torch.long)
    for other in decoders[1:]:
        if len(other):
            counts += cosines(reference, other).max(1).values >= match_cos
    return torch.nonzero(counts >= min_seeds).squeeze(1).tolist()
