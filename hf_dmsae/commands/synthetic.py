"""Ground-truth benchmark: the shipped distillation and transfer in a synthetic world with known useful features.

    python scripts/synthetic.py configs/synthetic.json [--seeds 0 1 2 --train_rows 1000000 …]

The JSON file holds any field of `SyntheticArguments` (the world, its task, seeds, budgets), `SAEArguments`,
`AttributionArguments` and `DMSAETrainingArguments`; command-line flags override it. Re-running resumes (every run
under `--output_dir` is resumable, `results.json` keeps finished seeds); the report goes to `<output_dir>/report.md`.
"""

import logging

from hf_dmsae.attribution import AttributionArguments
from hf_dmsae.runs import SAEArguments, parse_arguments
from hf_dmsae.synthetic import SyntheticArguments, SyntheticBenchmark
from hf_dmsae.trainer import DMSAETrainingArguments


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arguments = parse_arguments((SyntheticArguments, SAEArguments, AttributionArguments, DMSAETrainingArguments))
    benchmark = SyntheticBenchmark(*arguments)
    benchmark.run()
    print(benchmark.report())


if __name__ == "__main__":
    main()
