"""What a DMSAE's latents do on texts: `capture` runs a live LM up to the SAE's hook on each text and records, at
every position, the token, the latents (inference mode) and the reconstruction's squared error; `LatentRecord.top`
gives a latent's highest activations with their contexts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.activations import TrainingPositions
from ..data.language_model import LayerActivations
from ..model.configuration_dmsae import DMSAEConfig
from ..model.modeling_dmsae import DMSAEModel, SparseLatents
from .splicing import check_fits, latent_indices


def text_token_ids(tokenizer, text: str, prepend_bos: bool = True, context_length: int | None = None) -> torch.Tensor:
    """`[1, T]` token ids of `text` as training reads a document: its tokens, after the BOS token if `prepend_bos`
    (and the tokenizer has one), cut at `context_length`."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"a text must be a non-empty string, got {text!r}")
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
    ids = (bos + tokenizer(text, add_special_tokens=False)["input_ids"])[:context_length]
    return torch.tensor([ids], dtype=torch.long)


@dataclass
class TopActivation:
    """One of a latent's highest activations: its value, where it is (text, position), the token and a window of
    the text around it with the token in brackets."""

    activation: float
    text: int
    position: int
    token: str
    context: str


@dataclass
class LatentRecord:
    """Every position of every text captured, text after text: `latents` (row `text_starts[i] + t` is position
    `t` of text `i`; normalised units, as the SAE's latents are), `squared_error` `‖x − x̂‖²` in raw units, and
    `read`: whether the SAE reads the position (not a special token; training never shows it one)."""

    config: DMSAEConfig
    token_ids: list[torch.Tensor]
    tokens: list[list[str]]
    latents: SparseLatents
    squared_error: torch.Tensor
    read: torch.Tensor
    text_starts: list[int]

    def activations(self, latent: int | str) -> list[torch.Tensor]:
        """Latent `latent`'s activation `[T_i]` at each position of each text."""
        (index,) = latent_indices(self.config, latent).tolist()
        column = torch.zeros(self.latents.shape[0])
        chosen = self.latents.cols == index
        column[self.latents.rows[chosen].cpu()] = self.latents.values[chosen].float().cpu()
        ends = [*self.text_starts[1:], self.latents.shape[0]]
        return [column[start:end] for start, end in zip(self.text_starts, ends, strict=True)]

    def top(self, latent: int | str, n: int = 10, context: int = 8) -> list[TopActivation]:
        """Latent `latent`'s `n` highest activations at positions the SAE reads, highest first, each with
        `context` tokens either side."""
        if n < 1 or context < 0:
            raise ValueError(f"n={n} and context={context} must be at least 1 and 0")
        found = []
        for text, values in enumerate(self.activations(latent)):
            read = self.read[self.text_starts[text] : self.text_starts[text] + len(values)]
            for position in torch.nonzero((values > 0) & read).squeeze(1).tolist():
                found.append((float(values[position]), text, position))
        found.sort(key=lambda entry: -entry[0])
        return [self._top_activation(*entry, context) for entry in found[:n]]

    def _top_activation(self, activation: float, text: int, position: int, context: int) -> TopActivation:
        tokens = self.tokens[text]
        left = "".join(tokens[max(0, position - context) : position])
        right = "".join(tokens[position + 1 : position + 1 + context])
        window = f"{left}[{tokens[position]}]{right}"
        return TopActivation(activation, text, position, tokens[position], window)


@torch.no_grad()
def capture(
    lm,
    tokenizer,
    sae: DMSAEModel,
    texts: str | Sequence[str],
    prepend_bos: bool = True,
    context_length: int | None = None,
) -> LatentRecord:
    """Run `lm` up to `sae`'s hook (its config's layer and hook point) on each text (`text_token_ids`) and record
    the latents the SAE gives every position in inference mode. An LM other than the SAE's is refused by name."""
    check_fits(lm, sae)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("no texts given")
    layer = LayerActivations(lm, sae.config.hook_layer, sae.config.hook_name)
    special = TrainingPositions(tokenizer, 0.0, None)
    device = next(lm.parameters()).device
    token_ids, tokens, parts, errors, read, starts = [], [], [], [], [], []
    training, first = sae.training, 0
    sae.eval()
    try:
        for text in texts:
            ids = text_token_ids(tokenizer, text, prepend_bos, context_length).to(device)
            hidden = layer(ids)
            x = hidden[0].to(sae.device, sae.dtype)
            latents = sae.encode_sparse(x)
            errors.append((x - sae.decode_sparse(latents)).float().pow(2).sum(1).cpu())
            read.append(special.mask(ids, hidden)[0].cpu())
            parts.append(latents)
            starts.append(first)
            first += len(x)
            token_ids.append(ids[0].cpu())
            tokens.append([tokenizer.decode([i]) for i in ids[0].tolist()])
    finally:
        sae.train(training)
    latents = SparseLatents(
        torch.cat([p.rows + start for p, start in zip(parts, starts, strict=True)]),
        torch.cat([p.cols for p in parts]),
        torch.cat([p.values for p in parts]),
        (first, sae.config.dict_size),
    )
    return LatentRecord(sae.config, token_ids, tokens, latents, torch.cat(errors), torch.cat(read), starts)
