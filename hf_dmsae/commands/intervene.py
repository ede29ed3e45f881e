"""Ablate, clamp or add to a DMSAE's latents on one text and print what the LM's next-token predictions lose.

    hf-dmsae-intervene --model runs/smollm2-135m-l15/cycle2 --text "The Eiffel Tower is in Paris." --latents core

The LM is the one the SAE's config names (`--lm` for a local copy); latents are indices, stable ids
(`cycle0:1234`) or `core`.
"""

import logging
from dataclasses import dataclass, field
from typing import Literal

from hf_dmsae.analysis import intervene
from hf_dmsae.data.language_model import load_language_model
from hf_dmsae.model.modeling_dmsae import DMSAEModel
from hf_dmsae.reporting.tables import markdown_table
from hf_dmsae.run.launch import parse_arguments


@dataclass
class InterveneArguments:
    model: str = field(metadata={"help": "The DMSAE: a folder or Hub repo `from_pretrained` reads."})
    text: str = field(metadata={"help": "The text the LM reads."})
    latents: list[str] = field(metadata={"help": "Latent indices, stable ids (`cycle0:1234`) or `core`."})
    mode: Literal["ablate", "clamp", "add"] = field(default="ablate", metadata={"help": "What is done to them."})
    value: float | None = field(default=None, metadata={"help": "`clamp` / `add`: the value, in latent units."})
    error_term: bool = field(
        default=True, metadata={"help": "Add back the SAE's error `x − x̂`, so that only the edit reaches the LM."}
    )
    lm: str | None = field(
        default=None, metadata={"help": "The LM, e.g. a local copy (default: the SAE config's `base_model`)."}
    )
    top: int = field(default=5, metadata={"help": "Tokens most promoted and suppressed shown."})

    def latent_list(self) -> str | list[int | str]:
        if self.latents == ["core"]:
            return "core"
        return [int(latent) if latent.isdigit() else latent for latent in self.latents]


def intervention_lines(result, top: int) -> list[str]:
    """A table of each predicted position, then the means and the tokens most promoted and suppressed."""
    per_position = zip(
        result.loss_clean.tolist(),
        result.loss_change.tolist(),
        result.kl.tolist(),
        result.promoted_at,
        result.suppressed_at,
        strict=True,
    )
    rows = [
        (t, repr(result.tokens[t]), repr(result.tokens[t + 1]), f"{clean:.3f}", f"{change:+.3f}", f"{kl:.4f}")
        + (repr(up), repr(down))
        for t, (clean, change, kl, up, down) in enumerate(per_position)
    ]
    header = ("position", "token", "next token", "loss clean", "Δ loss", "KL", "most promoted", "most suppressed")
    lines = markdown_table(header, rows)
    lines += [
        "",
        f"mean Δ loss {float(result.loss_change.mean()):+.4f}, mean KL {float(result.kl.mean()):.4f}",
        "promoted: " + ", ".join(f"{token!r} {change:+.3f}" for token, change in result.promoted[:top]),
        "suppressed: " + ", ".join(f"{token!r} {change:+.3f}" for token, change in result.suppressed[:top]),
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = parse_arguments((InterveneArguments,), argv)
    sae = DMSAEModel.from_pretrained(args.model)
    name = args.lm or sae.config.base_model
    if not name:
        raise ValueError(f"{args.model}'s config names no base_model: give the LM with --lm")
    lm, tokenizer = load_language_model(name, hook_layer=sae.config.hook_layer)
    (result,) = intervene(lm, tokenizer, sae, args.text, args.latent_list(), args.mode, args.value, args.error_term)
    print("\n".join(intervention_lines(result, args.top)))


if __name__ == "__main__":
    main()
