"""The core's dynamics against the paper's Fig. 3 (distilled, random-init and no core; budgets, seeds, ablations).

    python scripts/core_dynamics.py configs/smollm2-135m.json [options]
    python scripts/core_dynamics.py configs/synthetic.json --study_source synthetic [options]

The command is `hf_dmsae.commands.core_dynamics` (installed as `hf-dmsae-core-dynamics`); `--help` lists every option.
"""

from hf_dmsae.commands.core_dynamics import main

if __name__ == "__main__":
    main()
