"""Write a static HTML feature browser for a DMSAE on a text split (one streaming pass over the text).

    python scripts/browse.py [options]

The command is `hf_dmsae.commands.browse` (installed as `hf-dmsae-browse`); `--help` lists every option.
"""

from hf_dmsae.commands.browse import main

if __name__ == "__main__":
    main()
