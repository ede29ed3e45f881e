"""The convergence sweep on the embedded default: which learning rate, batch size, passes and dead-latent settings
make its SAEs train (`studies.convergence`).

    python scripts/convergence.py configs/smollm2-135m.json --sweep configs/convergence.json \
        --results_dir reports/convergence

The JSON file is the distillation's own config (its distillation and attribution fields are skipped); any field of
`ConvergenceArguments`, `StudyArguments`, `SAEArguments`, `ActivationArguments` and `DMSAETrainingArguments` can be
given on the command line. Re-running continues from `<results_dir>/results.json`; the report goes beside it.
"""

import logging

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import DistillationArguments
from hf_dmsae.reporting.convergence import convergence_report
from hf_dmsae.run.arguments import SAEArguments, refuse_unread
from hf_dmsae.run.launch import end_processes, parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.studies.arguments import StudyArguments
from hf_dmsae.studies.convergence import ConvergenceArguments, ConvergenceSweep


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sweep, study, sae, activations, training = parse_arguments(
        (ConvergenceArguments, StudyArguments, SAEArguments, ActivationArguments, DMSAETrainingArguments),
        shared=(DistillationArguments, AttributionArguments),
    )
    refuse_unread(sae, ("sparsity",), "each of --variants names its core's mode")
    refuse_unread(study, ("matryoshka_ks",), "the sweep trains every variant at --ks")
    run = ConvergenceSweep(sweep, study, sae, activations, training)
    run.run()
    if training.process_index == 0:
        print(convergence_report(run.results_path.parent))
    end_processes()


if __name__ == "__main__":
    main()
