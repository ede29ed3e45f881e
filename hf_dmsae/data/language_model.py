"""A causal LM of `transformers` read at one hook point: loading it, finding its blocks, and running it up to the hook
(harvesting), through the hook with a gradient (attribution) or with the hook's activations replaced (evaluation)."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from .embedded import resolve_model

HOOK_POINTS = ("resid_post", "resid_pre")


def load_language_model(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    hook_layer: int | None = None,
    context_length: int | None = None,
):
    """The causal LM (eval mode, no gradients on its weights) and its tokenizer, after checking that the hooked block
    and the context length exist in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    lm = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=getattr(torch, dtype))
    lm.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    text_config = lm.config.get_text_config()
    if hook_layer is not None and not 0 <= hook_layer < text_config.num_hidden_layers:
        raise ValueError(
            f"hook_layer={hook_layer} is invalid: {name_or_path} has {text_config.num_hidden_layers} blocks"
        )
    positions = getattr(text_config, "max_position_embeddings", None)
    if context_length is not None and positions is not None and context_length > positions:
        raise ValueError(f"context_length={context_length} is invalid: {name_or_path} has {positions} positions")
    return lm, tokenizer


def lm_width(args) -> int:
    """The residual width of the LM of `ActivationArguments`, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(args.model_name_or_path), revision=args.model_revision)
    return config.get_text_config().hidden_size


def weights_digest(lm: nn.Module) -> str:
    """A short hash of the LM's weights (per-tensor sums in float64): part of a run's identity, so that other weights
    under the same name are noticed."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(lm.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{float(tensor.double().sum()):.10e}".encode())
    return digest.hexdigest()[:16]


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's list of transformer blocks (the `nn.ModuleList` with one entry per hidden layer)."""
    num_layers = lm.config.get_text_config().num_hidden_layers
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"Could not find the {num_layers} decoder blocks of {type(lm).__name__}")


class _StopForward(Exception):
    """Raised by the hook to end the forward pass once the hooked block has run."""


class LayerActivations:
    """A causal LM read at one hook point: `resid_post` is the output of block `layer` (= `hidden_states[layer + 1]`
    of a full forward, except after the last block, where transformers applies the final norm); `resid_pre` is the
    input of block `layer`.

    Calling it runs the LM only up to the hook and returns the activations `[B, T, d]`; `with_gradient` runs the
    whole LM and also returns the gradient of the summed next-token loss with respect to those activations.
    """

    def __init__(self, lm: nn.Module, layer: int, hook_name: str = "resid_post"):
        if hook_name not in HOOK_POINTS:
            raise ValueError(f"hook_name={hook_name!r} is invalid: must be one of {HOOK_POINTS}")
        self.lm, self.block, self.hook_name = lm, decoder_layers(lm)[layer], hook_name

    def _hook(self, transform):
        """Register `transform(hidden) -> hidden` at the hook point (it may raise to end the pass)."""
        if self.hook_name == "resid_post":

            def after_block(module, args, output):
                if isinstance(output, tuple):
                    return (transform(output[0]), *output[1:])
                return transform(output)

            return self.block.register_forward_hook(after_block)

        def before_block(module, args, kwargs):
            if args:
                return (transform(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}

        return self.block.register_forward_pre_hook(before_block, with_kwargs=True)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def capture_and_stop(hidden):
            captured.append(hidden)
            raise _StopForward

        handle = self._hook(capture_and_stop)
        try:
            self.lm(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    def patched_logits(self, input_ids: torch.Tensor, transform) -> torch.Tensor:
        """Logits of a full forward with the activations at the hook replaced by `transform(hidden)`."""
        handle = self._hook(transform)
        try:
            return self.lm(input_ids=input_ids, use_cache=False).logits
        finally:
            handle.remove()

    def with_gradient(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations and `∂L/∂x` at the hook, `L` the next-token cross-entropy summed over all positions of the
        batch. The activations become a leaf of the graph, so backward runs through the upper blocks only."""
        captured: list[torch.Tensor] = []

        def make_leaf(hidden):
            leaf = hidden.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf

        handle = self._hook(make_leaf)
        try:
            with torch.enable_grad():
                logits = self.lm(input_ids=input_ids, use_cache=False).logits
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum"
                )
                (gradient,) = torch.autograd.grad(loss, captured[0])
        finally:
            handle.remove()
        return captured[0].detach(), gradient
