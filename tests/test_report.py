import shutil
from pathlib import Path

import pytest

from hf_dmsae.reporting.reports import core_dynamics_report, synthetic_report


@pytest.mark.parametrize(
    "folder, write",
    [("synthetic", synthetic_report), ("core-dynamics-synthetic", core_dynamics_report)],
)
def test_a_committed_report_regenerates_byte_identical_from_its_committed_results(tmp_path, folder, write):
    committed = Path(__file__).parents[1] / "reports" / folder
    shutil.copy2(committed / "results.json", tmp_path / "results.json")
    assert write(tmp_path) == (committed / "report.md").read_text()
    assert (tmp_path / "report.md").read_bytes() == (committed / "report.md").read_bytes()
