"""The SAEs a transfer trains and a study compares, by name, parsed once into a `Variant`.

A variant is a DMSAE of any sparsity mode around the distilled core (`dense_core`, …), the Matryoshka SAE without one
(`matryoshka`), the paper's control around random unit rows as many as the core's (`random_<mode>`, Fig. 3), the
stronger control around as many trained latents of the distillation's last cycle outside the core
(`trained_<mode>`, the distillation's `random_trained`), or the dense baseline the paper lacks, a block of the core's
size trained from a fresh initialisation (`learned_<mode>`).
The model's own vocabulary is its sparsity modes (`DMSAEConfig.sparsity`); the variants are the studies'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..model.configuration_dmsae import SPARSITY_MODES

LEARNED_MODES = ("linear_core",)
"""The modes a learned block is trained in (the learned dense block: a `linear_core` of the core's rank)."""
VARIANTS = (
    *SPARSITY_MODES,
    "matryoshka",
    *(f"random_{mode}" for mode in SPARSITY_MODES),
    *(f"trained_{mode}" for mode in SPARSITY_MODES),
    *(f"learned_{mode}" for mode in LEARNED_MODES),
)
PAPER_VARIANTS = ("dense_core", "sparse_core", "matryoshka")

VARIANT_SETTINGS = {"core_sparsity_coef": ("penalized_core", "jumprelu_core"), "jumprelu_bandwidth": ("jumprelu_core",)}
"""SAE settings that only some core modes read, with those modes: they enter a run's identity only where one of its
variants reads them (a study keeps them per variant), so that a variant may be added at settings of its own."""


@dataclass(frozen=True)
class Variant:
    """What a variant's models are built around (`core`) and in which sparsity mode they train (`mode`; the
    Matryoshka SAE has no core, so `dense_core`'s masks are its)."""

    name: str
    core: Literal["distilled", "random", "trained", "learned", "none"]
    mode: str

    @classmethod
    def parse(cls, name: str) -> Variant:
        if name not in VARIANTS:
            raise ValueError(f"variant {name!r} is not among {VARIANTS}")
        if name == "matryoshka":
            return cls(name, "none", "dense_core")
        for prefix in ("random", "trained", "learned"):
            if name.startswith(f"{prefix}_"):
                return cls(name, prefix, name.removeprefix(f"{prefix}_"))
        return cls(name, "distilled", name)

    @property
    def settings(self) -> tuple[str, ...]:
        """The `VARIANT_SETTINGS` its models read."""
        return tuple(setting for setting, modes in VARIANT_SETTINGS.items() if self.mode in modes)


def check_variants(variants: list[str]) -> list[Variant]:
    """`variants` parsed, or a `ValueError` naming the unknown ones (the one check of every `variants` setting)."""
    if unknown := [v for v in variants if v not in VARIANTS]:
        raise ValueError(f"variants={variants} is invalid: {unknown} not among {VARIANTS}")
    return [Variant.parse(v) for v in variants]


def unread_settings(variants: list[str]) -> tuple[str, ...]:
    """The `VARIANT_SETTINGS` none of `variants` reads."""
    read = {setting for variant in check_variants(variants) for setting in variant.settings}
    return tuple(setting for setting in VARIANT_SETTINGS if setting not in read)
