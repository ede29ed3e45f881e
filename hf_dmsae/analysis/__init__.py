"""A trained DMSAE on a live LM: capture its latents on texts, splice it in at its hook, ablate, clamp or add to
latents and measure what the LM loses, and steer generation (docs/analysis.md)."""

from .capture import LatentRecord, TopActivation, capture, text_token_ids
from .intervention import Intervention, intervene, steer
from .splicing import check_fits, edit_latents, latent_indices, spliced

__all__ = [
    "Intervention",
    "LatentRecord",
    "TopActivation",
    "capture",
    "check_fits",
    "edit_latents",
    "intervene",
    "latent_indices",
    "spliced",
    "steer",
    "text_token_ids",
]
