"""One markdown report from the runs of a study: distillation (cycles, control), transfer (own and SAEBench metrics
against k) and the synthetic ground-truth benchmark. Each run already writes its `report.md` with figures under
`figures/`; this gathers them, with their figures and results, into one folder that can be committed or shared."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

SECTIONS = ("distillation", "transfer", "synthetic")


def write_report(runs: dict[str, str | Path], output_dir: str | Path, title: str) -> Path:
    """`runs` maps a section (of `SECTIONS`) to its run folder; returns the written `report.md`."""
    unknown = set(runs) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown report sections {sorted(unknown)}: expected some of {SECTIONS}")
    output_dir = Path(output_dir)
    (output_dir / "figures").mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    for section in SECTIONS:
        if section not in runs:
            continue
        folder = Path(runs[section])
        report = folder / "report.md"
        if not report.is_file():
            raise FileNotFoundError(f"{report} is missing: run the {section} first (its script writes it)")
        # Each run's headings move one level down under this report's title.
        parts.append(re.sub(r"^(#+) ", r"#\1 ", report.read_text(), flags=re.MULTILINE))
        for figure in sorted((folder / "figures").glob("*.png")):
            shutil.copy2(figure, output_dir / "figures" / figure.name)
        for results in ("results.json", "state.json"):
            if (folder / results).is_file():
                shutil.copy2(folder / results, output_dir / f"{section}-{results}")
    path = output_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
