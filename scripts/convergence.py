"""The convergence sweep on the embedded default (`make convergence`).

    python scripts/convergence.py configs/smollm2-135m.json --sweep configs/convergence.json \
        --results_dir reports/convergence

The command is `hf_dmsae.commands.convergence` (installed as `hf-dmsae-convergence`); `--help` lists every option.
"""

from hf_dmsae.commands.convergence import main

if __name__ == "__main__":
    main()
