"""Ground truth over many worlds: the synthetic benchmark on a family of drawn worlds, reported per world and across.

    python scripts/worlds.py configs/worlds.json [options]

The command is `hf_dmsae.commands.worlds` (installed as `hf-dmsae-worlds`); `--help` lists every option.
"""

from hf_dmsae.commands.worlds import main

if __name__ == "__main__":
    main()
