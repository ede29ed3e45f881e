"""Configuration of a Distilled Matryoshka Sparse Autoencoder (docs/method.md §1, §2 and §6)."""

import math
from dataclasses import field, fields
from types import UnionType
from typing import Literal, get_args, get_origin

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import PreTrainedConfig

from .sparsity import CORE_MODES, CoreMode

Sparsity = Literal["dense_core", "sparse_core", "penalized_core", "jumprelu_core", "linear_core"]
PrefixLossWeighting = Literal["sum", "dictionary_learning"]
DeadLatentLoss = Literal["auxk", "ghost_grads"]
SPARSITY_MODES = get_args(Sparsity)

# SAEBench's Matryoshka group fractions (1/32, 1/16, 1/8, 1/4, rest), applied to the non-core latents.
SAEBENCH_GROUP_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)


def matryoshka_group_sizes(num_latents: int, fractions: tuple[float, ...] = SAEBENCH_GROUP_FRACTIONS) -> list[int]:
    """Split `num_latents` into Matryoshka groups of the given fractions plus a last group with the rest.

    Groups that would be empty are dropped, so small dictionaries still get valid, non-empty groups.
    """
    sizes = [int(num_latents * f) for f in fractions]
    sizes = [s for s in sizes if s > 0]
    rest = num_latents - sum(sizes)
    if rest > 0:
        sizes.append(rest)
    return sizes


def _describe(kind) -> str:
    """A field's annotated type, as an error names it."""
    origin, args = get_origin(kind), get_args(kind)
    if origin is Literal:
        return f"str, one of {args}"
    if origin is UnionType:
        return " or ".join(_describe(option) for option in args)
    if origin is list:
        return f"list of {_describe(args[0])}"
    return "None" if kind is type(None) else kind.__name__


def _field_errors_named(cls):
    """`@strict` checks every field against its annotation; make its error the config's own `ValueError` naming the
    field, and let a float field take an int, as JSON and users write `1` for `1.0`."""
    strict_setattr, types = cls.__setattr__, {f.name: f.type for f in fields(cls)}
    floats = {name for name, kind in types.items() if kind in (float, float | None)}

    def __setattr__(self, name, value):
        if name in floats and type(value) is int:
            value = float(value)
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as error:
            rule = f"must be of type {_describe(types[name])}"
            raise ValueError(f"{cls.__name__}.{name}={value!r} is invalid: {rule}") from error

    cls.__setattr__ = __setattr__
    return cls


def noncore_k(k: int, dict_size: int, core_size: int) -> int:
    """Eq. 4: the non-core BatchTopK target that matches a SAEBench baseline of L0 `k` at width `dict_size`."""
    return max(1, round(k * (dict_size - core_size) / dict_size))


@_field_errors_named
@strict
class DMSAEConfig(PreTrainedConfig):
    r"""
    Configuration of a [`DMSAEModel`]: a Matryoshka BatchTopK sparse autoencoder whose first `core_size` latents
    form a core with (by default) frozen encoder rows.

    Latent `j` is a core latent for `j < core_size`; the non-core latents follow in Matryoshka groups of
    `group_sizes`. Every field is checked when the config is built; a bad value raises `ValueError` naming the field
    and the rule it breaks.

    ```python
    >>> from hf_dmsae import DMSAEConfig, DMSAEModel
    >>> config = DMSAEConfig(d_in=576, dict_size=4096, core_size=64, k=64, core_ids=[f"cycle0:{i}" for i in range(64)])
    >>> model = DMSAEModel(config)
    ```
    """

    model_type = "dmsae"

    d_in: int = field(
        default=2304, metadata={"help": "Width of the activations the SAE reads (Gemma-2-2B's residual stream: 2304)."}
    )

    dict_size: int = field(default=65536, metadata={"help": "Number of latents `n`, core included."})

    core_size: int = field(
        default=0,
        metadata={
            "help": "Number of core latents `c`, placed at indices `0 … c-1`. 0 gives a plain Matryoshka BatchTopK SAE."
        },
    )

    group_sizes: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "Sizes of the non-core Matryoshka groups, summing to `dict_size - core_size`. `None`: SAEBench's "
                "fractions 1/32, 1/16, 1/8, 1/4 and the rest, of the non-core latents."
            )
        },
    )

    k: int = field(
        default=160,
        metadata={
            "help": (
                "Target L0 of the equivalent SAEBench baseline at this width. In `sparse_core` mode the global "
                "BatchTopK target."
            )
        },
    )

    k_noncore: int | None = field(
        default=None,
        metadata={
            "help": (
                "BatchTopK target on the non-core latents in `dense_core` mode. `None`: Eq. 4 from `k` at this "
                "model's core size; runs fix it by one rule (docs/method.md §2: a distillation's is `k` in every "
                "cycle)."
            )
        },
    )

    sparsity: Sparsity = field(
        default="dense_core",
        metadata={
            "help": (
                "`dense_core`: core latents are never masked, BatchTopK keeps `k_noncore · B` non-core activations. "
                "`sparse_core`: one global BatchTopK keeps `k · B` activations over all latents. Beyond the paper, "
                "the core outside the budget as in `dense_core`, made sparse by a penalty of weight "
                "`core_sparsity_coef`, so that a core latent fires only where it pays for itself: `penalized_core`, "
                "an L1 penalty on the core's activations; `jumprelu_core`, a learned threshold per core latent "
                "(JumpReLU) and an L0 penalty. `linear_core`: the core outside the budget and linear (signed, no "
                "ReLU); with trainable rows (`frozen_rows=0`) a learned dense linear block of rank `core_size`."
            )
        },
    )

    core_sparsity_coef: float = field(
        default=0.01,
        metadata={
            "help": "Weight in the loss of the core's sparsity penalty, the mean over rows of the core's summed "
            "activations (`penalized_core`, normalised units) or of its active latents (`jumprelu_core`)."
        },
    )

    jumprelu_bandwidth: float = field(
        default=0.001,
        metadata={"help": "`jumprelu_core`: width of the straight-through window of the thresholds' gradient."},
    )

    core_ids: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                'Stable identity of each core latent (e.g. `"cycle0:1234"`: learned in cycle 0 at index 1234), so '
                "carry-over between cycles is a set intersection. `None`: no core."
            )
        },
    )

    cycle: int = field(
        default=0,
        metadata={
            "help": (
                "Distillation cycle this model belongs to; the non-core latents it learns get ids "
                '`"cycle{cycle}:{index}"`.'
            )
        },
    )

    frozen_rows: int | None = field(
        default=None,
        metadata={"help": "Number of leading encoder rows (`0 … frozen_rows-1`) held frozen. `None`: the whole core."},
    )

    dead_latent_loss: DeadLatentLoss = field(
        default="auxk",
        metadata={
            "help": (
                'How dead latents learn to reconstruct the residual: `"auxk"`, each row\'s top `aux_k` at their ReLU '
                'pre-activations (no gradient to a latent below 0 on every row), or `"ghost_grads"`, all of them at '
                "`exp` of their pre-activations, rescaled to half the residual's norm."
            )
        },
    )

    aux_k: int | None = field(
        default=None,
        metadata={"help": "Number of dead latents the AuxK loss reconstructs the residual with. `None`: `d_in // 2`."},
    )

    aux_coef: float = field(default=1 / 32, metadata={"help": "Weight `α` of the dead latents' loss."})

    prefix_loss_weighting: PrefixLossWeighting = field(
        default="sum",
        metadata={
            "help": (
                '`"sum"`: `Σ_i ‖x − x̂_i‖²` as Eq. 5. `"dictionary_learning"`: each prefix weighted `1/G`, then '
                "averaged over the `G` prefixes (`Σ_i ‖x − x̂_i‖² / G²`), as dictionary_learning's Matryoshka trainer; "
                "under Adam only the AuxK loss's relative weight changes (×G²)."
            )
        },
    )

    train_core_bias: bool = field(
        default=True,
        metadata={"help": "Whether the core latents' encoder biases train (False: they keep their initial value, 0)."},
    )

    dead_tokens_threshold: int = field(
        default=10_000_000,
        metadata={
            "help": "A latent that has not fired for this many training tokens counts as dead (`dead_latent_loss`)."
        },
    )

    kernels: Literal["sparse", "reference"] = field(
        default="sparse",
        metadata={
            "help": (
                'Training-step implementation: `"sparse"` (only kept activations touched, `hf_dmsae.kernels`) or '
                '`"reference"` (plain dense tensors, `hf_dmsae.sparsity`); the two compute the same.'
            )
        },
    )

    threshold_beta: float = field(
        default=0.999,
        metadata={
            "help": "EMA decay of the inference threshold (the smallest kept activation of each training batch)."
        },
    )

    threshold: float | None = field(
        default=None,
        metadata={
            "help": (
                "Inference threshold as estimated in training; written from the model's buffer at save time for "
                "reading. The value in `model.safetensors` is the one the model uses."
            )
        },
    )

    norm_factor: float = field(
        default=1.0,
        metadata={
            "help": (
                "Activations are divided by this before encoding and reconstructions multiplied by it, so the saved "
                "model reads and writes raw activations (√E‖x‖² of the training data, so that `x / norm_factor` has "
                "unit mean squared norm; see `data.activations.norm_factor`)."
            )
        },
    )

    base_model: str | None = field(
        default=None, metadata={"help": "The language model whose activations the SAE reads (Hub name or path)."}
    )

    hook_layer: int | None = field(
        default=None, metadata={"help": "Index of the block whose output (or hook point) is read."}
    )

    hook_name: str | None = field(default=None, metadata={"help": 'Hook point, e.g. `"resid_post"`.'})

    def __post_init__(self, **kwargs):
        if self.group_sizes is None:
            self.group_sizes = matryoshka_group_sizes(self.num_noncore)
        if self.k_noncore is None:
            self.k_noncore = noncore_k(self.k, self.dict_size, self.core_size)
        if self.core_ids is None:
            self.core_ids = []
        if self.frozen_rows is None:
            self.frozen_rows = self.core_size
        if self.aux_k is None:
            self.aux_k = max(1, self.d_in // 2)
        self.check()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation, run again at save time: the same rules as at construction."""
        self.check()

    def check(self) -> None:
        """Raise `ValueError` naming the first field that breaks a rule."""

        def fail(name: str, rule: str) -> None:
            raise ValueError(f"DMSAEConfig.{name}={getattr(self, name)!r} is invalid: {rule}")

        for name in ("d_in", "dict_size", "k", "k_noncore", "aux_k"):
            if getattr(self, name) < 1:
                fail(name, "must be at least 1")
        if not 0 <= self.core_size <= self.dict_size:
            fail("core_size", f"must lie in [0, dict_size={self.dict_size}]")
        if any(g < 1 for g in self.group_sizes):
            fail("group_sizes", "every Matryoshka group needs at least one latent")
        if sum(self.group_sizes) != self.num_noncore:
            fail("group_sizes", f"must sum to dict_size - core_size = {self.num_noncore}")
        if self.k > self.dict_size:  # the L0 of a baseline of this width, in every mode
            fail("k", f"must not exceed dict_size={self.dict_size}")
        if self.core_unmasked and self.k_noncore > self.num_noncore:
            fail("k_noncore", f"must not exceed the {self.num_noncore} non-core latents")
        if len(self.core_ids) != self.core_size:
            fail("core_ids", f"needs one id per core latent ({self.core_size})")
        if len(set(self.core_ids)) != len(self.core_ids):
            fail("core_ids", "ids must be unique")
        if not 0 <= self.frozen_rows <= self.core_size:
            fail("frozen_rows", f"must lie in [0, core_size={self.core_size}]")
        for name in ("aux_coef", "core_sparsity_coef", "jumprelu_bandwidth", "threshold_beta", "norm_factor"):
            if not math.isfinite(getattr(self, name)):
                fail(name, "must be finite")
        if not self.aux_coef >= 0:
            fail("aux_coef", "must be non-negative")
        if not self.core_sparsity_coef >= 0:
            fail("core_sparsity_coef", "must be non-negative")
        if not self.jumprelu_bandwidth > 0:
            fail("jumprelu_bandwidth", "must be positive")
        if self.dead_tokens_threshold < 1:
            fail("dead_tokens_threshold", "must be at least 1")
        if not 0.0 <= self.threshold_beta < 1.0:
            fail("threshold_beta", "must lie in [0, 1)")
        if not self.norm_factor > 0:
            fail("norm_factor", "must be positive")

    @property
    def num_noncore(self) -> int:
        return self.dict_size - self.core_size

    @property
    def prefix_ends(self) -> list[int]:
        """End index (exclusive) of each Matryoshka prefix: `core_size + m_i` for i = 1 … G."""
        ends, end = [], self.core_size
        for g in self.group_sizes:
            end += g
            ends.append(end)
        return ends

    @property
    def core_mode(self) -> CoreMode:
        """The rules of the config's sparsity mode (`model.sparsity.CORE_MODES`)."""
        return CORE_MODES[self.sparsity]

    @property
    def core_unmasked(self) -> bool:
        """Whether the core is outside BatchTopK and the inference threshold (every mode but `sparse_core`)."""
        return self.core_mode.unmasked

    @property
    def core_linear(self) -> bool:
        """Whether the core's latents are linear read-outs (signed; `linear_core`) rather than ReLU's."""
        return self.core_mode.linear

    @property
    def first_masked_latent(self) -> int:
        """BatchTopK and the inference threshold act on latents from here on: the non-core ones when the core is
        unmasked, all of them in `sparse_core` mode."""
        return self.core_size if self.core_unmasked else 0

    @property
    def topk_per_row(self) -> int:
        """Average number of masked-region activations BatchTopK keeps per row: `k_noncore` or `k`."""
        return self.k_noncore if self.core_unmasked else self.k

    @property
    def core_penalty(self) -> float:
        """The weight of the core's sparsity penalty in the loss (0 but in `penalized_core` and `jumprelu_core`)."""
        return self.core_sparsity_coef if self.core_mode.penalized else 0.0

    @property
    def candidate_pool_size(self) -> int:
        """Latents scored for the next core: the core and the first non-core group (docs/method.md §3)."""
        return self.prefix_ends[0]

    def latent_ids(self) -> list[str]:
        """Stable id of every latent: the core's recorded ids, then `"cycle{cycle}:{index}"` for new latents."""
        return list(self.core_ids) + [f"cycle{self.cycle}:{j}" for j in range(self.core_size, self.dict_size)]


__all__ = [
    "DMSAEConfig",
    "matryoshka_group_sizes",
    "noncore_k",
    "SAEBENCH_GROUP_FRACTIONS",
    "SPARSITY_MODES",
]
