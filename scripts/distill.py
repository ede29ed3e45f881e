"""Distil a core of consistently useful SAE latents: train-and-select cycles, the distilled core, Hub repos.

    accelerate launch scripts/distill.py [options]

The command is `hf_dmsae.commands.distill` (installed as `hf-dmsae-distill`); `--help` lists every option.
"""

from hf_dmsae.commands.distill import main

if __name__ == "__main__":
    main()
