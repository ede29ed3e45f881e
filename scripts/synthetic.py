"""Ground-truth benchmark: the shipped distillation and transfer in a synthetic world with known useful features.

    python scripts/synthetic.py configs/synthetic.json [options]

The command is `hf_dmsae.commands.synthetic` (installed as `hf-dmsae-synthetic`); `--help` lists every option.
"""

from hf_dmsae.commands.synthetic import main

if __name__ == "__main__":
    main()
