"""A causal LM of `transformers` read at one hook point: loading it, finding its blocks, and running it up to the hook
(harvesting), through the hook with a gradient (attribution) or with the hook's activations replaced (evaluation)."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

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

    def patched_loss(self, input_ids: torch.Tensor, transform, per_position: bool = False) -> torch.Tensor:
        """The next-token loss summed over the batch (fp32) of a full forward with the activations at the hook
        replaced by `transform(hidden)`, or with `per_position` each position's `[B, T]` (`next_token_loss`); the
        vocabulary's logits are built a chunk of positions at a time."""
        with self.replaced(transform):
            return next_token_loss(self.lm, self._last_hidden(input_ids), input_ids, per_position=per_position)[0]

    @contextmanager
    def replaced(self, transform):
        """Inside the block, every forward of the LM (`lm(...)`, each step of `lm.generate(...)`) has the activations
        at the hook replaced by `transform(hidden)`; the hook is removed on leaving, also on an exception."""
        handle = self._hook(transform)
        try:
            yield self
        finally:
            handle.remove()

    def with_gradient(self, input_ids: torch.Tensor, transform=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations and `∂L/∂x` at the hook, `L` the next-token cross-entropy summed over all positions of the
        batch; with `transform`, both at `transform(hidden)` put in the activations' place. The activations become a
        leaf of the graph, so backward runs through the upper blocks only; the head's part of it is
        `next_token_loss`'s, chunk by chunk, so no whole `[B, T, vocab]` logits (or their gradient) exist at once."""
        captured: list[torch.Tensor] = []

        def make_leaf(hidden):
            leaf = (hidden if transform is None else transform(hidden)).detach().requires_grad_(True)
            captured.append(leaf)
            return leaf

        handle = self._hook(make_leaf)
        try:
            with torch.enable_grad():
                hidden = self._last_hidden(input_ids)
                _, grad_hidden = next_token_loss(self.lm, hidden, input_ids, gradient=True)
                (gradient,) = torch.autograd.grad(hidden, captured[0], grad_outputs=grad_hidden)
        finally:
            handle.remove()
        return captured[0].detach(), gradient

    def _last_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states `[B, T, d]` (after the final norm): the LM's forward without its head."""
        return self.lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


LOSS_CHUNK_VALUES = 2**26
"""Logits built at once by `next_token_loss`: 256 MB in fp32 (262 positions of Gemma-2's 256 000-token vocabulary,
1365 of SmolLM2's 49 152), against 4 GB for the whole logits of one 4 × 1024-token Gemma-2 batch and as much again
for their gradient."""

HEAD_SCALINGS = ("logit_scale", "logits_scaling")
"""Config fields by which some LMs' heads rescale their logits, which `head_logits` does not apply."""


def head_logits(lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's logits for final hidden states, as its `ForCausalLM.forward` computes them: the output embedding,
    then Gemma-2's soft-capping `cap · tanh(logits / cap)` where the config sets `final_logit_softcapping`."""
    config = lm.config.get_text_config()
    logits = lm.get_output_embeddings()(hidden)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def next_token_loss(
    lm: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, gradient: bool = False, per_position: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next-token cross-entropy (fp32 at least) summed over every position of a batch, from the final hidden
    states `[B, T, d]` (with `per_position`, each position's `[B, T]`, the last one's 0: it predicts nothing), and
    with `gradient` the sum's gradient with respect to them. Positions go through the head
    `LOSS_CHUNK_VALUES // vocab` at a time, each chunk's logits freed once its loss (and gradient) is taken, so the
    peak holds one chunk's logits. A position's gradient depends on its own logits only: it is the whole loss's, up
    to the head's matmul blocking."""
    config = lm.config.get_text_config()
    scaling = [name for name in HEAD_SCALINGS if getattr(config, name, None) not in (None, 1, 1.0)]
    if scaling:
        raise NotImplementedError(f"{type(lm).__name__}'s head rescales its logits ({scaling[0]}); not supported")
    batch, length, width = hidden.shape
    rows = hidden.detach()[:, :-1].reshape(-1, width)
    targets = input_ids[:, 1:].reshape(-1).to(hidden.device)
    chunk = max(1, LOSS_CHUNK_VALUES // lm.get_output_embeddings().weight.shape[0])
    loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
    total = hidden.new_zeros((), dtype=loss_dtype)
    each_row = hidden.new_empty(len(rows), dtype=loss_dtype) if per_position else None
    grad_rows = torch.empty_like(rows) if gradient else None
    for first in range(0, len(rows), chunk):
        part = rows[first : first + chunk].requires_grad_(gradient)
        with torch.set_grad_enabled(gradient):
            logits = head_logits(lm, part)
            each = F.cross_entropy(logits.to(loss_dtype), targets[first : first + chunk], reduction="none")
            loss = each.sum()
            if gradient:
                (grad_rows[first : first + chunk],) = torch.autograd.grad(loss, part)
        total = total + loss.detach()
        if per_position:
            each_row[first : first + chunk] = each.detach()
    if per_position:
        total = hidden.new_zeros((batch, length), dtype=loss_dtype)
        total[:, :-1] = each_row.view(batch, length - 1)
    if not gradient:
        return total, None
    grad_hidden = torch.zeros_like(hidden)
    grad_hidden[:, :-1] = grad_rows.view(batch, length - 1, width)
    return total, grad_hidden
