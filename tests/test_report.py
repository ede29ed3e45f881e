import shutil
from pathlib import Path

import pytest

from hf_dmsae.reporting.reports import core_dynamics_report, gather_reports, synthetic_report


def test_report_gathers_run_reports_figures_and_results(tmp_path):
    for section, figure in (("distillation", "l0_core.png"), ("transfer", "metrics_vs_k.png")):
        folder = tmp_path / section
        (folder / "figures").mkdir(parents=True)
        (folder / "report.md").write_text(f"# {section} report\n\n## Table\n\n![x](figures/{figure})\n")
        (folder / "figures" / figure).write_bytes(b"\x89PNG")
        (folder / "results.json").write_text("{}")
    runs = {"transfer": tmp_path / "transfer", "distillation": tmp_path / "distillation"}
    report = gather_reports(runs, tmp_path / "out", "Study").read_text()

    assert report.startswith("# Study")
    assert report.index("## distillation report") < report.index("## transfer report")
    assert "### Table" in report and "![x](figures/l0_core.png)" in report
    assert (tmp_path / "out" / "figures" / "metrics_vs_k.png").read_bytes() == b"\x89PNG"
    assert (tmp_path / "out" / "transfer-results.json").is_file()
    with pytest.raises(FileNotFoundError, match="run the synthetic first"):
        gather_reports({"synthetic": tmp_path / "nothing"}, tmp_path / "out", "Study")
    with pytest.raises(ValueError, match="unknown report sections"):
        gather_reports({"absorption": tmp_path}, tmp_path / "out", "Study")


@pytest.mark.parametrize(
    "folder, write",
    [("synthetic", synthetic_report), ("core-dynamics-synthetic", core_dynamics_report)],
)
def test_a_committed_report_regenerates_byte_identical_from_its_committed_results(tmp_path, folder, write):
    committed = Path(__file__).parents[1] / "reports" / folder
    shutil.copy2(committed / "results.json", tmp_path / "results.json")
    assert write(tmp_path) == (committed / "report.md").read_text()
    assert (tmp_path / "report.md").read_bytes() == (committed / "report.md").read_bytes()
