"""The paper's claims on a finished distillation (every variant over seeds, matched sparsity, consistency).

    accelerate launch scripts/study.py configs/smollm2-135m.json [options]

The command is `hf_dmsae.commands.study` (installed as `hf-dmsae-study`); `--help` lists every option.
"""

from hf_dmsae.commands.study import main

if __name__ == "__main__":
    main()
