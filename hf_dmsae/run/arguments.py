"""The SAE a run trains, as the command line gives it, and the one way every stage builds a model from it.

`SAEArguments` holds `DMSAEConfig`'s own fields (type, choices, default and help read from the config, so no setting
is declared twice) that a user chooses, plus the Matryoshka group fractions, which become group sizes once the core
size is known. `new_model` builds a fresh model around a core (or none) for the distillation, transfer, core dynamics
and the synthetic benchmark alike, with `k_noncore` by the one rule of `k_noncore_for`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import set_seed

from ..model.configuration_dmsae import (
    SAEBENCH_GROUP_FRACTIONS,
    DMSAEConfig,
    matryoshka_group_sizes,
    noncore_k,
)
from ..model.modeling_dmsae import DMSAEModel
from ..utils.fields import fields_of

SAE_FIELDS = (
    "dict_size",
    "k",
    "k_noncore",
    "sparsity",
    "core_sparsity_coef",
    "jumprelu_bandwidth",
    "dead_latent_loss",
    "aux_k",
    "aux_coef",
    "prefix_loss_weighting",
    "train_core_bias",
    "dead_tokens_threshold",
    "threshold_beta",
)
"""The `DMSAEConfig` fields a run's user chooses; the others come from the activations, the core or the cycle."""


CLI_DEFAULTS = {"dict_size": 4096, "k": 64}
"""Where the command line's default differs from the config's (the paper's 65 536 latents at L0 160): the embedded
default's width and L0, so that a run on a small LM given neither starts at a size that fits it."""


@dataclass
@fields_of(DMSAEConfig, *SAE_FIELDS, defaults=CLI_DEFAULTS)
class SAEArguments:
    """The SAE to train: `DMSAEConfig`'s fields of `SAE_FIELDS` and the group fractions."""

    group_fractions: list[float] = field(
        default_factory=lambda: list(SAEBENCH_GROUP_FRACTIONS),
        metadata={"help": "Matryoshka group fractions of the non-core latents; the rest forms the last group."},
    )

    def __post_init__(self):
        if any(f <= 0 for f in self.group_fractions) or sum(self.group_fractions) >= 1:
            raise ValueError(f"group_fractions={self.group_fractions} is invalid: positive, summing to less than 1")
        # DMSAEConfig checks every field (types, choices, ranges: the one statement of its rules); building one
        # without a core reports it now, before any harvesting (k_noncore is checked again against the real core).
        group_sizes = matryoshka_group_sizes(self.dict_size, tuple(self.group_fractions))
        DMSAEConfig(d_in=1, group_sizes=group_sizes, **{name: getattr(self, name) for name in SAE_FIELDS})


def refuse_unread(args, names: tuple[str, ...], why: str) -> None:
    """The one rule for settings a command does not read: given other than their defaults, they are refused, naming
    them and `why`, rather than silently ignored or recorded in the run's identity."""
    defaults = {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(args)
    }
    if given := [f"--{name} {getattr(args, name)}" for name in names if getattr(args, name) != defaults[name]]:
        raise ValueError(f"{', '.join(given)}: not read here, {why}")


def k_noncore_for(sae: SAEArguments, reference_core_size: int) -> int:
    """The one rule for `k_noncore`: the value given, else Eq. 4 from `k` at the core size of the model a stage's
    models are compared with. A distillation's cycles and the core-dynamics study compare with the coreless cycle 0
    (core size 0: `k_noncore = k` in every cycle); a transfer compares each DMSAE with a Matryoshka SAE of L0 `k`
    (its own core size); a single run has no core (`k`)."""
    if sae.k_noncore is not None:
        return sae.k_noncore
    return noncore_k(sae.k, sae.dict_size, reference_core_size)


def sae_config(sae: SAEArguments, data, **overrides) -> DMSAEConfig:
    """The `DMSAEConfig` of a new SAE on the activations of `data` (a `RunData` or another source with
    `sae_fields()`); `overrides` (e.g. a core) win."""
    core_size = overrides.get("core_size", 0)
    settings = {name: getattr(sae, name) for name in SAE_FIELDS}
    settings["group_sizes"] = matryoshka_group_sizes(sae.dict_size - core_size, tuple(sae.group_fractions))
    return DMSAEConfig(**(settings | data.sae_fields() | overrides))


def new_model(sae: SAEArguments, data, core=None, *, seed: int, cycle: int = 0, learned_core: int = 0) -> DMSAEModel:
    """A freshly initialised model (under `seed`) on `data`'s activations, around `core` (a `DMSAECore`: its rows
    copied bit for bit into the frozen encoder rows, its ids kept), around a learned core of `learned_core` latents
    (ids `learned:i`; initialised as every other latent and trained, none frozen), or without a core."""
    set_seed(seed)
    if core is not None and learned_core:
        raise ValueError("a model has either a given core or a learned one, not both")
    if learned_core:
        ids = [f"learned:{i}" for i in range(learned_core)]
        return DMSAEModel(sae_config(sae, data, cycle=cycle, core_size=learned_core, core_ids=ids, frozen_rows=0))
    if core is None:
        return DMSAEModel(sae_config(sae, data, cycle=cycle))
    config = sae_config(sae, data, cycle=cycle, core_size=len(core), core_ids=list(core.latent_ids))
    return DMSAEModel.from_core(config, torch.as_tensor(core.encoder_rows))


def initial_model(trained: DMSAEModel, seed: int) -> DMSAEModel:
    """The model `new_model` gave under `seed` before `trained` was trained from it, rebuilt from its config and
    frozen core rows: what training left in place is measured against it."""
    set_seed(seed)
    if trained.config.frozen_rows == 0:  # no core, or a learned one
        return DMSAEModel(copy.deepcopy(trained.config))
    return DMSAEModel.from_core(trained.config, trained.W_enc_frozen.detach().cpu())
