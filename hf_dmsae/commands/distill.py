"""Distil a core of consistently useful SAE latents: train-and-select cycles, the distilled core, Hub repos.

    accelerate launch scripts/distill.py configs/smollm2-135m.json [--field value ...]

The JSON file holds any field of `DistillationArguments`, `SAEArguments`, `ActivationArguments`,
`AttributionArguments` and `DMSAETrainingArguments`; command-line flags override it. Re-running the same command
resumes a crashed run. With `--push_to_hub true` and a token, each cycle's core, the distilled core and the last
model are pushed; otherwise they stay as local repo folders under `<output_dir>/repos`.
"""

import logging

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import Distillation, DistillationArguments
from hf_dmsae.reporting.distillation import distillation_report
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.launch import end_processes, parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arguments = parse_arguments(
        (DistillationArguments, SAEArguments, ActivationArguments, AttributionArguments, DMSAETrainingArguments)
    )
    run = Distillation(*arguments)
    run.run()
    if run.state.writer:
        print(distillation_report(run.output_dir))
    end_processes()


if __name__ == "__main__":
    main()
