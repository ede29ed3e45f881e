"""The settings every study shares, declared and checked once: which seeds, which SAEs at which k, what counts as the
same latent, where the results go (`StudyArguments`), and which activations a study reads where it may read either
(`StudySourceArguments`). Each study's own arguments hold only what is its own."""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..run.variants import PAPER_VARIANTS, VARIANTS, check_variants
from ..utils.checks import check_ranges


@dataclass
class StudyArguments:
    """Seeds, the SAEs compared and at which k, the consistency threshold and where `results.json` goes."""

    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Seeds of every model, each a full run.", "aliases": ["--study_seeds"]},
    )
    ks: list[int] = field(
        default_factory=lambda: [16, 32, 64],
        metadata={"help": "k of every variant.", "aliases": ["--transfer_ks"]},
    )
    variants: list[str] = field(
        default_factory=lambda: list(PAPER_VARIANTS),
        metadata={"help": f"The SAEs compared, of {VARIANTS} (default: the paper's)."},
    )
    matryoshka_ks: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Further k of the Matryoshka SAE alone, so that its curve in measured L0 spans the dense-core "
            "models' (their core adds to k) for the comparison at matched L0."
        },
    )
    latent_match_cos: float = field(
        default=0.9, metadata={"help": "Decoder cosine at which two SAEs' latents match (consistency, claim 2)."}
    )
    ce_batches: int = field(default=4, metadata={"help": "Held-out LM batches for CE loss recovered."})
    results_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where results.json (continued from), report.md and figures/ go (default: the study's runs)."
        },
    )

    def __post_init__(self):
        check_ranges(self, ks=">= 1", matryoshka_ks=">= 1", latent_match_cos="(0, 1]", ce_batches=">= 0")
        check_variants(self.variants)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} is invalid: give distinct seeds")
        if not self.ks or not self.variants:
            raise ValueError(f"ks={self.ks} and variants={self.variants} must be non-empty")
        if set(self.ks) & set(self.matryoshka_ks):
            raise ValueError(f"matryoshka_ks={self.matryoshka_ks} repeats some of ks={self.ks}")

    @property
    def middle_k(self) -> int:
        """The k at which seeds are compared where a study does not say."""
        return sorted(self.ks)[len(self.ks) // 2]


@dataclass
class StudySourceArguments:
    """Which activations a study that may read either reads."""

    study_source: Literal["lm", "synthetic"] = field(
        default="lm",
        metadata={
            "help": "lm: the LM and text of the activation arguments (the distillation in output_dir); synthetic: "
            "the world of the synthetic arguments."
        },
    )


def study_identity(study: StudyArguments) -> dict:
    """What of `study` a study's results depend on (where they are written is not)."""
    return {name: value for name, value in dataclasses.asdict(study).items() if name != "results_dir"}
