"""Train DMSAEs around a distilled core at several sparsities, with Matryoshka baselines, and compare them.

    accelerate launch scripts/transfer.py configs/smollm2-135m.json \
        --core runs/smollm2-135m-l15/repos/<…-core-distilled>

The JSON file holds any field of `TransferArguments`, `SAEArguments`, `ActivationArguments` and
`DMSAETrainingArguments` and `SAEBenchArguments` (the distillation's fields are skipped); flags override it; `--core`
takes a local folder or a Hub repo id; `--saebench_evals core meta_structure …` picks SAEBench's evals
(none: `--saebench_evals none`). Re-running resumes; the table is written to `<output_dir>/report.md`.
"""

import logging

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.evaluation.saebench import SAEBenchArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import DistillationArguments
from hf_dmsae.method.transfer import Transfer, TransferArguments
from hf_dmsae.reporting.transfer import transfer_report
from hf_dmsae.run.arguments import SAEArguments, refuse_unread
from hf_dmsae.run.launch import end_processes, parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.run.variants import unread_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arguments = parse_arguments(
        (TransferArguments, SAEArguments, ActivationArguments, DMSAETrainingArguments, SAEBenchArguments),
        shared=(DistillationArguments, AttributionArguments),
    )
    transfer, sae = arguments[:2]
    refuse_unread(sae, ("sparsity",), "each of --variants names its core's mode (e.g. --variants jumprelu_core)")
    refuse_unread(
        sae, unread_settings(transfer.variants), f"no variant of --variants {' '.join(transfer.variants)} reads it"
    )
    run = Transfer(*arguments)
    run.run()
    if run.training_args.process_index == 0:
        print(transfer_report(run.output_dir))
    end_processes()


if __name__ == "__main__":
    main()
