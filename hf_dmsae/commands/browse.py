"""Write a static HTML feature browser for a DMSAE on a text split (one streaming pass over the text).

    python scripts/browse.py configs/smollm2-135m.json --model runs/smollm2-135m-l15/cycle2 --site_dir runs/browser \
        --cores runs/smollm2-135m-l15/distilled-core

The JSON file may be a run's config (its LM, layer and dataset are used; the fields of other scripts are skipped);
flags override it. Without one, the LM, layer and hook point are the model config's (`base_model`, `hook_layer`,
`hook_name`), unless given as flags. Open `<site_dir>/index.html` in a browser.

    hf-dmsae-browse --model org/dmsae-smollm2-135m-l15 --site_dir runs/browser --neuronpedia_dir runs/neuronpedia
"""

import dataclasses
import logging
import sys

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import DistillationArguments
from hf_dmsae.model.configuration_dmsae import DMSAEConfig
from hf_dmsae.publishing.browser import BrowseArguments, browse
from hf_dmsae.publishing.hub import resolve_folder
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.launch import parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments


def read_where_the_model_reads(activations: ActivationArguments, model: str, argv: list[str]) -> ActivationArguments:
    """`activations` with the model config's LM, layer and hook point where no run config or flag gives them."""
    if argv and argv[0].endswith(".json"):
        return activations
    config = DMSAEConfig.from_pretrained(resolve_folder(model))
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    from_config = {"model_name_or_path": config.base_model, "hook_layer": config.hook_layer}
    from_config["hook_name"] = config.hook_name
    return dataclasses.replace(
        activations, **{name: value for name, value in from_config.items() if value is not None and name not in given}
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args, activations = parse_arguments(
        (BrowseArguments, ActivationArguments),
        argv,
        shared=(SAEArguments, DistillationArguments, AttributionArguments, DMSAETrainingArguments),
    )
    activations = read_where_the_model_reads(activations, args.model, argv)
    print(browse(args, activations) / "index.html")


if __name__ == "__main__":
    main()
