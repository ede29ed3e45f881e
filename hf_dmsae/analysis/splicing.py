"""A DMSAE spliced into a live LM at its hook: the activation `x` replaced by `decode(edit(encode(x)))`, or with the
error term `x + decode(edit(encode(x))) − decode(encode(x))` (SAELens's `use_error_term`), for any forward or
generation run inside `spliced(...)`; the latents an edit addresses, by index, stable id or `"core"`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Literal

import torch

from ..data.embedded import same_model
from ..data.language_model import LayerActivations
from ..model.configuration_dmsae import DMSAEConfig
from ..model.modeling_dmsae import DMSAEModel

Edit = Callable[[torch.Tensor], torch.Tensor]
"""Latents `[N, dict_size]` of the positions spliced → the latents decoded in their place."""
EditMode = Literal["ablate", "clamp", "add"]
EDIT_MODES = ("ablate", "clamp", "add")
Latents = int | str | Iterable[int | str]
"""Latents by index, by stable id (`"cycle0:1234"`, `DMSAEConfig.latent_ids`), a list of either, or `"core"`."""


def latent_indices(config: DMSAEConfig, latents: Latents) -> torch.Tensor:
    """The indices of `latents` in a model of `config`, in the order given, each once; unknown ones are refused by
    name."""
    if isinstance(latents, str) and latents == "core":
        if config.core_size == 0:
            raise ValueError('latents="core": this SAE has no core')
        return torch.arange(config.core_size)
    if isinstance(latents, int | str):
        latents = [latents]
    ids = {latent_id: index for index, latent_id in enumerate(config.latent_ids())}
    indices = []
    for latent in latents:
        if isinstance(latent, bool) or not isinstance(latent, int | str):
            raise ValueError(f"latent {latent!r} is neither an index nor a latent id")
        if isinstance(latent, str):
            if latent not in ids:
                examples = ", ".join(repr(i) for i in config.latent_ids()[:2])
                raise ValueError(f"latent id {latent!r} is not one of this SAE's (e.g. {examples})")
            latent = ids[latent]
        if not 0 <= latent < config.dict_size:
            raise ValueError(f"latent {latent} is out of range: this SAE has {config.dict_size} latents")
        if latent not in indices:
            indices.append(latent)
    if not indices:
        raise ValueError("no latents given")
    return torch.tensor(indices, dtype=torch.long)


def edit_latents(indices: torch.Tensor, mode: EditMode, value: float | None = None) -> Edit:
    """The edit that sets the latents at `indices` to 0 (`ablate`), to `value` (`clamp`) or adds `value` to them
    (`add`), in the latents' own units (what `capture` records)."""
    if mode not in EDIT_MODES:
        raise ValueError(f"mode={mode!r} is invalid: must be one of {EDIT_MODES}")
    if (mode == "ablate") != (value is None):
        raise ValueError(f"mode={mode!r} {'takes no' if mode == 'ablate' else 'needs a'} value")

    def edit(latents: torch.Tensor) -> torch.Tensor:
        edited = latents.clone()
        columns = indices.to(latents.device)
        if mode == "ablate":
            edited[:, columns] = 0.0
        elif mode == "clamp":
            edited[:, columns] = value
        else:
            edited[:, columns] += value
        return edited

    return edit


def check_fits(lm, sae: DMSAEModel) -> None:
    """Refuse an LM other than the one `sae` reads, naming what differs: its width, its depth at the hook, or its
    name (`data.embedded.same_model`: a local copy of a Hub model fits)."""
    config, text = sae.config, lm.config.get_text_config()
    if config.hook_layer is None or config.hook_name is None:
        raise ValueError("the SAE's config names no hook (hook_layer and hook_name): set them to where it reads")
    problems = []
    if text.hidden_size != config.d_in:
        problems.append(f"its width is {text.hidden_size} (the SAE's d_in: {config.d_in})")
    if config.hook_layer >= text.num_hidden_layers:
        problems.append(f"it has {text.num_hidden_layers} blocks (the SAE reads block {config.hook_layer})")
    name = str(getattr(lm.config, "name_or_path", "") or "")
    if config.base_model and not same_model(config.base_model, name):
        problems.append(
            f"it is {name!r}, the SAE was trained on {config.base_model!r} (if they are the same model, set "
            "sae.config.base_model to this name)"
        )
    if problems:
        raise ValueError(f"this LM is not the one the SAE reads: {'; '.join(problems)}")


@contextmanager
def spliced(
    lm,
    sae: DMSAEModel,
    error_term: bool = False,
    edit: Edit | None = None,
    positions: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
):
    """Inside the block, `lm(...)` and `lm.generate(...)` run with the activation at `sae`'s hook replaced by its
    reconstruction `decode(edit(encode(x)))` (inference mode: the learned threshold), or with `error_term` by
    `x + decode(edit(encode(x))) − decode(encode(x))`, which is `x` itself without an edit. `positions(input_ids,
    hidden) -> [B, T] bool` chooses the positions replaced (e.g. `TrainingPositions.mask`: the ones the SAE read in
    training); every position without it, as SAELens does. Hooks and the SAE's mode are restored on leaving."""
    check_fits(lm, sae)
    layer = LayerActivations(lm, sae.config.hook_layer, sae.config.hook_name)
    forward_ids: list[torch.Tensor | None] = [None]

    def remember_ids(module, args, kwargs):
        forward_ids[0] = kwargs.get("input_ids", args[0] if args else None)

    def reconstructed(x: torch.Tensor) -> torch.Tensor:
        latents = sae.encode(x)
        edited = latents if edit is None else edit(latents)
        if not error_term:
            return sae.decode(edited)
        return x + (sae.decode(edited) - sae.decode(latents))

    def transform(hidden: torch.Tensor) -> torch.Tensor:
        if error_term and edit is None:
            return hidden
        if positions is None:
            return reconstructed(hidden.to(sae.dtype)).to(hidden.dtype)
        if forward_ids[0] is None:
            raise ValueError("spliced(positions=...) needs the LM called with input_ids")
        read = positions(forward_ids[0], hidden)
        if not read.any():
            return hidden
        out = hidden.clone()
        out[read] = reconstructed(hidden[read].to(sae.dtype)).to(hidden.dtype)
        return out

    training = sae.training
    sae.eval()
    ids_hook = lm.register_forward_pre_hook(remember_ids, with_kwargs=True)
    try:
        with layer.replaced(transform):
            yield
    finally:
        ids_hook.remove()
        sae.train(training)
