import shutil
from pathlib import Path

import pytest

from hf_dmsae.reporting.claims import claims_report
from hf_dmsae.reporting.convergence import convergence_report
from hf_dmsae.reporting.core_dynamics import core_dynamics_report
from hf_dmsae.reporting.scorers import scorers_report
from hf_dmsae.reporting.synthetic import synthetic_report
from hf_dmsae.reporting.worlds import worlds_report

REPORTS = Path(__file__).parents[1] / "reports"
PRODUCERS = (
    ("core-dynamics-", core_dynamics_report),
    ("synthetic", synthetic_report),
    ("worlds", worlds_report),
    ("scorers-", scorers_report),
    ("study-", claims_report),
    ("convergence", convergence_report),
)
"""Which report writes each committed folder, by its name. Not here: `demo-smollm2-135m` (a distillation's report
reads its cores, which are not committed), `paper-scale` (written by its own script), `browser` (screenshots)."""
COMMITTED = sorted(p.name for p in REPORTS.iterdir() if (p / "results.json").is_file() and p.name != "paper-scale")


@pytest.mark.parametrize("folder", COMMITTED)
def test_a_committed_report_regenerates_byte_identical_from_its_committed_results(tmp_path, folder):
    """What a report says is in its results: refactoring the reports changes no committed byte."""
    write = next((write for prefix, write in PRODUCERS if folder.startswith(prefix)), None)
    assert write, f"reports/{folder} has no producer in PRODUCERS"
    shutil.copytree(REPORTS / folder, tmp_path / folder, ignore=shutil.ignore_patterns("report.md", "figures"))
    assert write(tmp_path / folder) == (REPORTS / folder / "report.md").read_text()
    assert (tmp_path / folder / "report.md").read_bytes() == (REPORTS / folder / "report.md").read_bytes()
