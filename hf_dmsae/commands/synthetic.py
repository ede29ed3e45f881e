"""Ground-truth benchmark: distillation + transfer vs Matryoshka on sae_lens's synthetic hierarchical features.

    python scripts/synthetic.py [config.json] [--num_features 1024 --seeds 0 1 …]

Fields are those of `hf_dmsae.synthetic.SyntheticArguments`. Re-running resumes (trained SAEs and
`results.json` are kept in `--output_dir`); the report goes to `<output_dir>/report.md`.
"""

import logging

from hf_dmsae.runs import parse_arguments
from hf_dmsae.synthetic import SyntheticArguments, SyntheticBenchmark


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = parse_arguments((SyntheticArguments,))
    benchmark = SyntheticBenchmark(args)
    benchmark.run()
    print(benchmark.report())


if __name__ == "__main__":
    main()
