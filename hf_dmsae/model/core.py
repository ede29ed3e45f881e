"""`DMSAECore`: a selected core as a Hub artifact (docs/method.md §3, §4 and §6).

A core is what one distillation cycle hands to the next: the encoder rows of the selected latents (copied bit for
bit into the next model's frozen rows), their stable ids, their attribution scores, the coverage curve over the whole
candidate pool, and where it came from. An encoder row is a latent's gain along its unit-norm decoder direction, the
same whatever units the activations are normalised to, so rows move between models of any normalisation unchanged.
On disk (a folder or a Hub repo): `core.safetensors` (`encoder_rows`, `scores`, `pool_scores`, `coverage_curve`,
with the digest of their bytes), `config.json` (ids and provenance, written by `ModelHubMixin` from the JSON-able
fields) and a model card.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelHubMixin, hf_hub_download

from ..utils.integrity import load_tensors, save_tensors, tensor_digest

CORE_WEIGHTS = "core.safetensors"


@dataclass
class DMSAECore(ModelHubMixin, library_name="hf_dmsae", tags=["dmsae", "sparse-autoencoder", "interpretability"]):
    """The selected core of one cycle (or the distilled core)."""

    encoder_rows: torch.Tensor
    """`[c, d_in]` encoder rows of the core latents, in the order of `latent_ids`."""

    latent_ids: list[str]
    """Stable id of each core latent (`"cycle{t}:{index}"`, t the cycle that first learned it)."""

    scores: torch.Tensor
    """`[c]` attribution score of each core latent (q-quantile of |gradient × activation|)."""

    pool_ids: list[str]
    """Ids of every scored candidate latent (core ∪ prefix-0), by descending score."""

    pool_scores: torch.Tensor
    """`[|P|]` scores of `pool_ids`, descending."""

    coverage_curve: torch.Tensor
    """`[|P|]` cumulative share of the pool's total score covered by the first i+1 latents of `pool_ids`."""

    provenance: dict = field(default_factory=dict)
    """Cycle, source model and revision, base LM, layer, hook, q, τ, tokens scored, normalisation factor."""

    def __post_init__(self):
        counts = {len(self.encoder_rows), len(self.latent_ids), len(self.scores)}
        if self.encoder_rows.ndim != 2 or len(counts) != 1:
            raise ValueError(
                f"a core needs one encoder row, id and score per latent: rows {tuple(self.encoder_rows.shape)}, "
                f"{len(self.latent_ids)} ids, {len(self.scores)} scores"
            )
        if len(self.pool_ids) != len(self.pool_scores) or len(self.pool_scores) != len(self.coverage_curve):
            raise ValueError(
                f"a core's pool needs one score and coverage value per id: {len(self.pool_ids)} ids, "
                f"{len(self.pool_scores)} scores, {len(self.coverage_curve)} coverage values"
            )
        if len(set(self.latent_ids)) != len(self.latent_ids):
            raise ValueError("core latent ids must be unique")
        if not torch.isfinite(self.encoder_rows).all():
            raise ValueError("a core's encoder rows must be finite")

    def __len__(self) -> int:
        return len(self.latent_ids)

    @property
    def coverage(self) -> float:
        """Share of the pool's total score the core covers."""
        return float(self.coverage_curve[len(self) - 1]) if len(self) else 0.0

    def digest(self) -> str:
        """A hash of the core's rows and ids: its identity in a run that uses it."""
        ids = hashlib.sha256("\n".join(self.latent_ids).encode()).hexdigest()
        return hashlib.sha256((tensor_digest({"encoder_rows": self.encoder_rows}) + ids).encode()).hexdigest()[:16]

    def intersect(self, other: DMSAECore, **provenance) -> DMSAECore:
        """The latents of this core whose ids are also in `other` (rows, scores from this core): with this the
        last cycle's core and `other` the one before, the distilled core `C* = C^(T) ∩ C^(T−1)` (Eq. 8)."""
        keep = [i for i, latent in enumerate(self.latent_ids) if latent in set(other.latent_ids)]
        return DMSAECore(
            encoder_rows=self.encoder_rows[keep].clone(),
            latent_ids=[self.latent_ids[i] for i in keep],
            scores=self.scores[keep].clone(),
            pool_ids=list(self.pool_ids),
            pool_scores=self.pool_scores.clone(),
            coverage_curve=self.coverage_curve.clone(),
            provenance={**self.provenance, **provenance},
        )

    def _save_pretrained(self, save_directory: Path) -> None:
        tensors = {
            "encoder_rows": self.encoder_rows,
            "scores": self.scores,
            "pool_scores": self.pool_scores,
            "coverage_curve": self.coverage_curve,
        }
        save_tensors(tensors, save_directory / CORE_WEIGHTS)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision,
        cache_dir,
        force_download,
        local_files_only,
        token,
        latent_ids,
        pool_ids,
        provenance=None,
        **kwargs,
    ) -> DMSAECore:
        """Ids and provenance arrive from `config.json` through `ModelHubMixin` (which leaves out an empty
        provenance); the tensors are read here."""
        path = Path(model_id) / CORE_WEIGHTS
        if not path.is_file():
            path = hf_hub_download(
                model_id,
                CORE_WEIGHTS,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                force_download=force_download,
                local_files_only=local_files_only,
            )
        tensors = load_tensors(path)
        return cls(latent_ids=latent_ids, pool_ids=pool_ids, provenance=provenance or {}, **tensors)
