"""The paper's claims on a finished distillation: its distilled core transferred at several k in every variant (with
the paper's random-init control) over seeds, compared with the Matryoshka SAE at matched measured L0, and the
consistency of latents across sparsities and seeds.

    accelerate launch scripts/study.py configs/smollm2-135m.json --saebench_evals core sparse_probing_sae_probes \
        meta_structure absorption

The JSON file is the distillation's own config (its distillation and attribution fields are skipped); any field of
`ClaimsArguments`, `StudyArguments`, `SAEArguments`, `ActivationArguments`, `DMSAETrainingArguments` and
`SAEBenchArguments` can be given on the command line. Re-running resumes (every model is a resumable transfer run; a
finished seed is kept in `results.json`); the results, report and figures go to `--results_dir` (default:
`--study_dir`).
"""

import logging

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.evaluation.saebench import SAEBenchArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import DistillationArguments
from hf_dmsae.reporting.claims import claims_report
from hf_dmsae.run.arguments import SAEArguments, refuse_unread
from hf_dmsae.run.launch import end_processes, parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.studies.arguments import StudyArguments
from hf_dmsae.studies.claims import ClaimsArguments, PaperClaims


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arguments = parse_arguments(
        (ClaimsArguments, StudyArguments, SAEArguments, ActivationArguments, DMSAETrainingArguments, SAEBenchArguments),
        shared=(DistillationArguments, AttributionArguments),
    )
    refuse_unread(
        arguments[2], ("sparsity",), "each of --variants names its core's mode (e.g. --variants jumprelu_core)"
    )
    study = PaperClaims(*arguments)
    study.run()
    if study.training_args.process_index == 0:
        print(claims_report(study.results_dir))
    end_processes()


if __name__ == "__main__":
    main()
