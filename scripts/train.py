"""Train one Matryoshka SAE or DMSAE on a causal LM's activations.

    accelerate launch scripts/train.py [options]

The command is `hf_dmsae.commands.train` (installed as `hf-dmsae-train`); `--help` lists every option.
"""

from hf_dmsae.commands.train import main

if __name__ == "__main__":
    main()
