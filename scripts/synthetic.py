"""Ground-truth benchmark: distillation + transfer vs Matryoshka on sae_lens's synthetic hierarchical features.

    python scripts/synthetic.py [options]

The command is `hf_dmsae.commands.synthetic` (installed as `hf-dmsae-synthetic`); `--help` lists every option.
"""

from hf_dmsae.commands.synthetic import main

if __name__ == "__main__":
    main()
