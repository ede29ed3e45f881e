"""The SAE a run trains, as the command line gives it, and the `DMSAEConfig` built from it on a run's activations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..model.configuration_dmsae import SAEBENCH_GROUP_FRACTIONS, DMSAEConfig, matryoshka_group_sizes


@dataclass
class SAEArguments:
    """The SAE to train (see `DMSAEConfig` for each field's meaning)."""

    dict_size: int = field(default=4096, metadata={"help": "Number of latents, core included."})
    k: int = field(default=64, metadata={"help": "Target L0 of the SAEBench-equivalent baseline."})
    k_noncore: int | None = field(
        default=None,
        metadata={
            "help": "Non-core BatchTopK target. Distillation: the same in every cycle (default k). Transfer and "
            "single runs: default Eq. 4 from k."
        },
    )
    sparsity: Literal["dense_core", "sparse_core"] = field(
        default="dense_core", metadata={"help": "dense_core: the core is never masked; sparse_core: one BatchTopK."}
    )
    group_fractions: list[float] = field(
        default_factory=lambda: list(SAEBENCH_GROUP_FRACTIONS),
        metadata={"help": "Matryoshka group fractions of the non-core latents; the rest forms the last group."},
    )
    aux_coef: float = field(default=1 / 32, metadata={"help": "AuxK loss weight."})
    prefix_loss_weighting: Literal["sum", "dictionary_learning"] = field(
        default="sum",
        metadata={
            "help": "sum: Σ of the prefix losses (Eq. 5); dictionary_learning: Σ/G² (G prefixes), as its "
            "Matryoshka trainer (under Adam: AuxK weighs G² times more)."
        },
    )
    train_core_bias: bool = field(
        default=True, metadata={"help": "Train the core latents' encoder biases (False: they stay at 0)."}
    )
    dead_tokens_threshold: int = field(default=10_000_000, metadata={"help": "Tokens without firing = dead."})
    threshold_beta: float = field(default=0.999, metadata={"help": "EMA decay of the inference threshold."})

    def __post_init__(self):
        if self.dict_size < 2:
            raise ValueError(f"dict_size={self.dict_size} is invalid: must be at least 2")
        if not 1 <= self.k <= self.dict_size:
            raise ValueError(f"k={self.k} is invalid: must lie in [1, dict_size={self.dict_size}]")
        if self.k_noncore is not None and not 1 <= self.k_noncore < self.dict_size:
            raise ValueError(f"k_noncore={self.k_noncore} is invalid: must lie in [1, dict_size={self.dict_size})")
        if any(f <= 0 for f in self.group_fractions) or sum(self.group_fractions) >= 1:
            raise ValueError(f"group_fractions={self.group_fractions} is invalid: positive, summing to less than 1")
        # Everything else DMSAEConfig checks; building one here reports it now, before any harvesting.
        DMSAEConfig(
            d_in=1,
            dict_size=self.dict_size,
            k=self.k,
            k_noncore=self.k_noncore,
            sparsity=self.sparsity,
            aux_coef=self.aux_coef,
            dead_tokens_threshold=self.dead_tokens_threshold,
            prefix_loss_weighting=self.prefix_loss_weighting,
            train_core_bias=self.train_core_bias,
            threshold_beta=self.threshold_beta,
            group_sizes=matryoshka_group_sizes(self.dict_size, tuple(self.group_fractions)),
        )


def sae_config(sae: SAEArguments, data, **overrides) -> DMSAEConfig:
    """The `DMSAEConfig` of a new SAE on the activations of `data` (a `RunData` or another source with
    `sae_fields()`); `overrides` (e.g. a core) win."""
    core_size = overrides.get("core_size", 0)
    settings = dict(
        dict_size=sae.dict_size,
        group_sizes=matryoshka_group_sizes(sae.dict_size - core_size, tuple(sae.group_fractions)),
        k=sae.k,
        k_noncore=sae.k_noncore,
        sparsity=sae.sparsity,
        aux_coef=sae.aux_coef,
        prefix_loss_weighting=sae.prefix_loss_weighting,
        train_core_bias=sae.train_core_bias,
        dead_tokens_threshold=sae.dead_tokens_threshold,
        threshold_beta=sae.threshold_beta,
        **data.sae_fields(),
    )
    return DMSAEConfig(**{**settings, **overrides})
