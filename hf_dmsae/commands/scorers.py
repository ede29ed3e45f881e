"""The scorers compared: GxA, latent ablation and integrated gradients, in the synthetic world against the useful
features and on the LM against each other, with their cost.

    python scripts/scorers.py configs/synthetic.json --study_source synthetic --results_dir reports/scorers-synthetic
    python scripts/scorers.py configs/smollm2-135m.json --study_source lm --results_dir reports/scorers-smollm2

The JSON file is the benchmark's or the distillation's own config (a distillation's own fields are skipped); any
field of `ScorerStudyArguments`, `StudySourceArguments`, `StudyArguments` (the synthetic distillations' seeds,
`results_dir`), `SAEArguments`, `ActivationArguments` (lm), `SyntheticArguments` (synthetic),
`AttributionArguments` and `DMSAETrainingArguments` can be given on the command line. Re-running continues from
`<results_dir>/results.json`; the report goes beside it.
"""

import logging

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import DistillationArguments
from hf_dmsae.reporting.scorers import scorers_report
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.launch import parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.studies.arguments import StudyArguments, StudySourceArguments
from hf_dmsae.studies.scorers import ScorerStudy, ScorerStudyArguments
from hf_dmsae.studies.synthetic_world import SyntheticArguments


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arguments = parse_arguments(
        (
            ScorerStudyArguments,
            StudySourceArguments,
            StudyArguments,
            SAEArguments,
            ActivationArguments,
            SyntheticArguments,
            AttributionArguments,
            DMSAETrainingArguments,
        ),
        shared=(DistillationArguments,),
    )
    study = ScorerStudy(*arguments)
    study.run()
    print(scorers_report(study.results_dir))


if __name__ == "__main__":
    main()
