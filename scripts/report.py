"""Gather a study's run reports (distillation, transfer, synthetic benchmark) into one folder.

    python scripts/report.py [options]

The command is `hf_dmsae.commands.report` (installed as `hf-dmsae-report`); `--help` lists every option.
"""

from hf_dmsae.commands.report import main

if __name__ == "__main__":
    main()
