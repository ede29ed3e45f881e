"""Ground-truth benchmark: the shipped distillation and transfer in a synthetic world with known useful features.

    python scripts/synthetic.py configs/synthetic.json [--seeds 0 1 2 --train_rows 1000000 …]

The JSON file holds any field of `StudyArguments` (seeds, variants, ks), `SyntheticArguments` (the world, its task,
budgets), `SAEArguments`, `AttributionArguments` and `DMSAETrainingArguments`; command-line flags override it.
Re-running resumes (every run under `--output_dir` is resumable, `results.json` keeps finished seeds); results and
report go to `--results_dir` (default: `--output_dir`).
"""

import logging

from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.reporting.synthetic import synthetic_report
from hf_dmsae.run.arguments import SAEArguments, refuse_unread
from hf_dmsae.run.launch import parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.studies.arguments import StudyArguments
from hf_dmsae.studies.synthetic import SyntheticBenchmark
from hf_dmsae.studies.synthetic_world import SyntheticArguments


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arguments = parse_arguments(
        (StudyArguments, SyntheticArguments, SAEArguments, AttributionArguments, DMSAETrainingArguments)
    )
    refuse_unread(arguments[0], ("ce_batches",), "the synthetic world has no language model")
    benchmark = SyntheticBenchmark(*arguments)
    benchmark.run()
    print(synthetic_report(benchmark.results_path.parent))


if __name__ == "__main__":
    main()
