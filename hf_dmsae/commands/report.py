"""Gather a study's run reports (distillation, transfer, synthetic benchmark) into one folder.

    python scripts/report.py --out reports/smollm2-135m --distillation runs/smollm2-135m-l15 \
        --transfer runs/transfer --synthetic runs/synthetic
"""

import argparse

from hf_dmsae.reporting.reports import SECTIONS, gather_reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder the report, figures and results are written to.")
    parser.add_argument("--title", default="DMSAE study report", help="The report's first heading.")
    for section in SECTIONS:
        parser.add_argument(f"--{section}", help=f"Output folder of the {section} run.")
    args = parser.parse_args()
    runs = {s: getattr(args, s) for s in SECTIONS if getattr(args, s)}
    print(gather_reports(runs, args.out, args.title))


if __name__ == "__main__":
    main()
