"""Ground truth over many worlds: the synthetic benchmark on a family of worlds drawn from stated ranges, screened by
a plain Matryoshka SAE, with per-world and across-worlds reports.

    python scripts/worlds.py configs/worlds.json [--num_worlds 24 --family_seed 1 …]

The JSON file holds any field of `WorldFamilyArguments` (how many worlds, the ranges, the screen), `StudyArguments`
(seeds, variants, ks, results_dir), `SyntheticArguments` (the base world: every field the family does not draw),
`SAEArguments`, `AttributionArguments` and `DMSAETrainingArguments`; command-line flags override it. Re-running resumes
(every world's runs are resumable, `results.json` keeps finished worlds); the report goes beside `results.json`, each
kept world's in `world<i>/`.
"""

import logging

from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.reporting.synthetic import synthetic_report
from hf_dmsae.reporting.worlds import worlds_report
from hf_dmsae.run.arguments import SAEArguments, refuse_unread
from hf_dmsae.run.launch import parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.studies.arguments import StudyArguments
from hf_dmsae.studies.synthetic_world import SyntheticArguments
from hf_dmsae.studies.worlds import WorldFamily, WorldFamilyArguments


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arguments = parse_arguments(
        (
            WorldFamilyArguments,
            StudyArguments,
            SyntheticArguments,
            SAEArguments,
            AttributionArguments,
            DMSAETrainingArguments,
        )
    )
    refuse_unread(arguments[1], ("ce_batches",), "the synthetic world has no language model")
    family = WorldFamily(*arguments)
    results = family.run()
    folder = family.results_path.parent
    for name in results["across_worlds"]["worlds"]:
        synthetic_report(folder / name)
    print(worlds_report(folder))


if __name__ == "__main__":
    main()
