"""The scorers compared (GxA, latent ablation, integrated gradients): synthetic world and LM.

    python scripts/scorers.py configs/synthetic.json --results_dir reports/scorers-synthetic
    python scripts/scorers.py configs/smollm2-135m.json --study_source lm --results_dir reports/scorers-smollm2

The command is `hf_dmsae.commands.scorers` (installed as `hf-dmsae-scorers`); `--help` lists every option.
"""

from hf_dmsae.commands.scorers import main

if __name__ == "__main__":
    main()
