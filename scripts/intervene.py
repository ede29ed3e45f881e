"""Ablate, clamp or add to a DMSAE's latents on one text and print what the LM's next-token predictions lose.

    python scripts/intervene.py --model runs/smollm2-135m-l15/cycle2 --text "…" --latents core

The command is `hf_dmsae.commands.intervene` (installed as `hf-dmsae-intervene`); `--help` lists every option.
"""

from hf_dmsae.commands.intervene import main

if __name__ == "__main__":
    main()
