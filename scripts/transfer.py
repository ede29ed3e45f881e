"""Train DMSAEs around a distilled core at several sparsities, with Matryoshka baselines, and compare them.

    accelerate launch scripts/transfer.py [options]

The command is `hf_dmsae.commands.transfer` (installed as `hf-dmsae-transfer`); `--help` lists every option.
"""

from hf_dmsae.commands.transfer import main

if __name__ == "__main__":
    main()
