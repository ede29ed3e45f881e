"""Train one Matryoshka SAE or DMSAE on a causal LM's activations.

    accelerate launch scripts/train.py configs/smollm2-135m.json [--field value ...]

The JSON file holds any field of `SAEArguments`, `ActivationArguments` and `DMSAETrainingArguments` (fields of the
distillation's arguments are skipped, so one file serves both scripts); command-line flags override it. Re-running the same command resumes from the last complete checkpoint in `output_dir`.
"""

import json
import logging

from transformers import set_seed

from hf_dmsae import DMSAEModel
from hf_dmsae.activations import ActivationArguments
from hf_dmsae.attribution import AttributionArguments
from hf_dmsae.distillation import DistillationArguments
from hf_dmsae.runs import SAEArguments, parse_arguments, prepare_activations, sae_config, train_sae
from hf_dmsae.trainer import DMSAETrainingArguments


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sae_args, activation_args, training_args = parse_arguments(
        (SAEArguments, ActivationArguments, DMSAETrainingArguments),
        shared=(DistillationArguments, AttributionArguments),
    )
    data = prepare_activations(activation_args, training_args)
    set_seed(training_args.seed)
    model = DMSAEModel(sae_config(sae_args, activation_args, data))
    trainer = train_sae(model, data, training_args)
    if data.eval is not None:
        metrics = trainer.evaluate()
        if trainer.is_world_process_zero():
            print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))


if __name__ == "__main__":
    main()
