"""Write a static HTML feature browser for a DMSAE on a text split (one streaming pass over the text).

    python scripts/browse.py configs/smollm2-135m.json --model runs/smollm2-135m-l15/cycle2 --site_dir runs/browser \
        --cores runs/smollm2-135m-l15/distilled-core

The JSON file may be a run's config (its LM, layer and dataset are used; the fields of other scripts are skipped);
flags override it. Open `<site_dir>/index.html` in a browser.
"""

import logging

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import DistillationArguments
from hf_dmsae.publishing.browser import BrowseArguments, browse
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.launch import parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args, activations = parse_arguments(
        (BrowseArguments, ActivationArguments),
        shared=(SAEArguments, DistillationArguments, AttributionArguments, DMSAETrainingArguments),
    )
    print(browse(args, activations) / "index.html")


if __name__ == "__main__":
    main()
