"""The core's dynamics against the paper's Fig. 3: E[L0_core] over training for the distilled core, a random-init core
and no core, at several budgets and seeds, with one ablation per hypothesis of what drives a dense core towards
always-on.

    python scripts/core_dynamics.py configs/smollm2-135m.json --budgets 200000 500000 996352  # the demo's core
    python scripts/core_dynamics.py configs/synthetic.json --study_source synthetic  # the synthetic benchmark's

The JSON file is the distillation's own config (its distillation and attribution fields are skipped); any field of
`CoreDynamicsArguments`, `StudySourceArguments`, `StudyArguments` (seeds, `results_dir`), `SAEArguments`,
`ActivationArguments` (lm) or `SyntheticArguments` (synthetic) and `DMSAETrainingArguments` can be given on the
command line. Re-running resumes; results and report go to
`--results_dir` (default: `--study_dir`).
"""

import logging

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import DistillationArguments
from hf_dmsae.reporting.core_dynamics import core_dynamics_report
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.launch import parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.studies.arguments import StudyArguments, StudySourceArguments
from hf_dmsae.studies.core_dynamics import CoreDynamics, CoreDynamicsArguments
from hf_dmsae.studies.synthetic_world import SyntheticArguments


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args, source, study, sae, activations, synthetic, training = parse_arguments(
        (
            CoreDynamicsArguments,
            StudySourceArguments,
            StudyArguments,
            SAEArguments,
            ActivationArguments,
            SyntheticArguments,
            DMSAETrainingArguments,
        ),
        shared=(DistillationArguments, AttributionArguments),
    )
    lm = source.study_source == "lm"
    run = CoreDynamics(args, source, study, sae, activations if lm else None, None if lm else synthetic, training)
    run.run()
    print(core_dynamics_report(run.results_dir))


if __name__ == "__main__":
    main()
