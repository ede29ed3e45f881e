"""What a DMSAE's latents do to a live LM's predictions: `intervene` ablates, clamps or adds to latents and measures
the next-token loss and the KL divergence from the clean run at every position, and the tokens most promoted and
suppressed; `steer` generates with latents' decoder directions added to the residual stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.activations import TrainingPositions
from ..model.modeling_dmsae import DMSAEModel
from .capture import text_token_ids
from .splicing import EditMode, Latents, edit_latents, latent_indices, spliced


@dataclass
class Intervention:
    """One text with an edit against without it. Entry `t` of the per-position tensors is the prediction of token
    `t + 1` from position `t`: the next-token loss clean and edited, and `kl`, `KL(clean ‖ edited)` of the two
    next-token distributions, and the token whose log-probability the edit raised (`promoted_at`) and lowered
    (`suppressed_at`) most there. `promoted` / `suppressed`: the tokens it raised / lowered most on average over
    the positions, with that mean change."""

    tokens: list[str]
    loss_clean: torch.Tensor
    loss_edited: torch.Tensor
    kl: torch.Tensor
    promoted_at: list[str]
    suppressed_at: list[str]
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]

    @property
    def loss_change(self) -> torch.Tensor:
        """`loss_edited − loss_clean` at each position."""
        return self.loss_edited - self.loss_clean


def ranked_tokens(tokenizer, top: torch.return_types.topk, sign: float = 1.0) -> list[tuple[str, float]]:
    """`(token, sign · value)` of a `topk` over the vocabulary, in its order."""
    return [(tokenizer.decode([i]), sign * v) for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)]


@torch.no_grad()
def intervene(
    lm,
    tokenizer,
    sae: DMSAEModel,
    texts: str | Sequence[str],
    latents: Latents,
    mode: EditMode = "ablate",
    value: float | None = None,
    error_term: bool = True,
    top: int = 5,
    prepend_bos: bool = True,
    context_length: int | None = None,
) -> list[Intervention]:
    """Each text (`text_token_ids`) run clean and with `latents` (indices, stable ids or `"core"`) ablated, clamped
    to `value` or with `value` added (in the latents' units), through `spliced`: with `error_term` (the default) only
    the edit's change reaches the LM, without it the SAE's whole reconstruction does. Special tokens, which the SAE
    never reads, stay clean."""
    if top < 1:
        raise ValueError(f"top={top} must be at least 1")
    edit = edit_latents(latent_indices(sae.config, latents), mode, value)
    positions = TrainingPositions(tokenizer, 0.0, None).mask
    device = next(lm.parameters()).device
    results = []
    for text in [texts] if isinstance(texts, str) else list(texts):
        ids = text_token_ids(tokenizer, text, prepend_bos, context_length).to(device)
        if ids.shape[1] < 2:
            raise ValueError(f"{text!r} has fewer than 2 tokens: nothing is predicted")
        clean = lm(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        with spliced(lm, sae, error_term=error_term, edit=edit, positions=positions):
            edited = lm(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        targets, change_at = ids[0, 1:], edited - clean
        change = change_at.mean(0)
        up, down = change.topk(top), (-change).topk(top)
        results.append(
            Intervention(
                tokens=[tokenizer.decode([i]) for i in ids[0].tolist()],
                loss_clean=F.nll_loss(clean, targets, reduction="none").cpu(),
                loss_edited=F.nll_loss(edited, targets, reduction="none").cpu(),
                kl=F.kl_div(edited, clean, log_target=True, reduction="none").sum(-1).cpu(),
                promoted_at=[tokenizer.decode([i]) for i in change_at.argmax(-1).tolist()],
                suppressed_at=[tokenizer.decode([i]) for i in change_at.argmin(-1).tolist()],
                promoted=ranked_tokens(tokenizer, up),
                suppressed=ranked_tokens(tokenizer, down, sign=-1.0),
            )
        )
    return results


@torch.no_grad()
def steer(
    lm, tokenizer, sae: DMSAEModel, prompt: str, scales: dict[int | str, float], prepend_bos: bool = True, **generate
) -> str:
    """The text `lm.generate` continues `prompt` with while every position but special tokens has `scale` added to
    each latent of `scales` (index or stable id → scale, in the latents' units): `scale · norm_factor · W_dec[j]`
    added to the residual stream at the SAE's hook. Greedy, 20 new tokens, unless `generate` says otherwise."""
    if not scales:
        raise ValueError("no latents to steer with")
    indices = latent_indices(sae.config, list(scales))
    if len(indices) != len(scales):
        raise ValueError(f"{list(scales)} name some latent twice")
    amounts = torch.tensor([float(v) for v in scales.values()], device=sae.device, dtype=sae.dtype)
    edit = edit_latents(indices, "add", amounts)
    ids = text_token_ids(tokenizer, prompt, prepend_bos).to(next(lm.parameters()).device)
    generate = {"max_new_tokens": 20, "do_sample": False, **generate}
    generate.setdefault("pad_token_id", tokenizer.pad_token_id or tokenizer.eos_token_id)
    positions = TrainingPositions(tokenizer, 0.0, None).mask
    with spliced(lm, sae, error_term=True, edit=edit, positions=positions):
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generate)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
