import json

import pytest

from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.reporting.scorers import scorers_report
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.launch import parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.studies.arguments import StudyArguments, StudySourceArguments
from hf_dmsae.studies.scorers import ScorerStudy, ScorerStudyArguments, compare_rankings
from hf_dmsae.studies.synthetic_world import SyntheticArguments

TYPES = (ScorerStudyArguments, StudySourceArguments, StudyArguments, SAEArguments, ActivationArguments)
TYPES += (SyntheticArguments, AttributionArguments, DMSAETrainingArguments)


def test_the_synthetic_study_distils_once_per_scorer_and_seed_and_continues(tmp_path):
    config = {
        "study_source": "synthetic",
        "num_features": 64,
        "hidden_dim": 32,
        "root_features": 2,
        "correlation_rank": 4,
        "readout_classes": 5,
        "seeds": [0],
        "num_cycles": 1,
        "train_rows": 4096,
        "eval_rows": 2048,
        "dict_size": 64,
        "k": 4,
        "group_fractions": [0.25, 0.25, 0.25],
        "attribution_tokens": 2048,
        "q": 0.95,
        "per_device_train_batch_size": 512,
        "learning_rate": 0.003,
        "report_to": "none",
        "scorers": ["gxa", "ablation:mean"],
        "study_dir": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "report"),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    results = ScorerStudy(*parse_arguments(TYPES, [str(tmp_path / "config.json")])).run()

    for spec, scorer, aggregation in (("gxa", "gxa", "quantile"), ("ablation:mean", "ablation", "mean")):
        run = results["synthetic"][spec]["0"]
        assert [r["core"] for r in run["selection"]] == ["cycle 0", "cycle 1", "distilled"]
        assert all(0 <= r["r_precision"] <= 1 for r in run["selection"] if r["r_precision"] is not None)
        assert len(run["scoring_seconds"]) == 2 and run["scored_rows"] == 2048
        core = json.loads(
            (tmp_path / "runs" / spec / "seed0" / "distillation" / "cycle0" / "core" / "config.json").read_text()
        )
        assert core["provenance"]["scorer"] == scorer and core["provenance"]["aggregation"] == aggregation
    report = scorers_report(tmp_path / "report")
    assert "| ablation:mean | distilled | 1 |" in report and "seconds per scoring" in report
    # A second run finds everything recorded and trains nothing.
    before = (tmp_path / "report" / "results.json").read_text()
    ScorerStudy(*parse_arguments(TYPES, [str(tmp_path / "config.json")])).run()
    assert (tmp_path / "report" / "results.json").read_text() == before
    with pytest.raises(ValueError, match="other settings"):
        ScorerStudy(*parse_arguments(TYPES, [str(tmp_path / "config.json"), "--tau", "0.5"])).run()


def test_rankings_are_compared_with_gxa_by_rank_and_by_the_cores_they_select():
    scored = {
        "gxa": {"scores": [4.0, 3.0, 2.0, 1.0, 0.0]},
        "same order": {"scores": [40.0, 30.0, 20.0, 10.0, 0.0]},
        "reversed": {"scores": [0.0, 1.0, 2.0, 3.0, 4.0]},
    }
    comparison = compare_rankings(scored, tau=0.5)
    assert comparison["same order"]["spearman vs gxa"] == pytest.approx(1.0)
    assert comparison["reversed"]["spearman vs gxa"] == pytest.approx(-1.0)
    assert comparison["same order"]["core jaccard vs gxa"] == 1.0 and comparison["reversed"]["core jaccard vs gxa"] == 0


def test_bad_scorer_specs_are_refused():
    with pytest.raises(ValueError, match="shapley"):
        ScorerStudyArguments(scorers=["shapley"])
    with pytest.raises(ValueError, match="ablation:median"):
        ScorerStudyArguments(scorers=["ablation:median"])


def test_the_lm_study_is_keyed_on_the_scored_distillation_and_refuses_another(tmp_path):
    """Two distillations' scores in one results.json would be correlated as if they were one model's."""

    def study(distillation):
        arguments = parse_arguments(TYPES, ["--study_source", "lm", "--results_dir", str(tmp_path / "report")])
        arguments[-1].output_dir = str(distillation)
        return ScorerStudy(*arguments)

    for name, weights in (("first", b"first model"), ("second", b"second model")):
        record = {"core": "distilled-core", "core_digest": "0" * 64, "size": 6, "last_cycle": 2}
        (tmp_path / name / "cycle2").mkdir(parents=True)
        (tmp_path / name / "cycle2" / "model.safetensors").write_bytes(weights)
        (tmp_path / name / "state.json").write_text(json.dumps({"kind": "distillation", "distilled": record}))
    (tmp_path / "report").mkdir()
    identity = study(tmp_path / "first").identity()
    (tmp_path / "report" / "results.json").write_text(json.dumps({"identity": identity}))
    with pytest.raises(ValueError, match=r"other settings \(scored: recorded \{'model': '.*first/cycle2'"):
        study(tmp_path / "second").run()
    (tmp_path / "first" / "cycle2" / "model.safetensors").write_bytes(b"the first folder, trained again")
    with pytest.raises(ValueError, match=r"other settings \(scored: .*'sha256': '[0-9a-f]{64}'\}, now"):
        study(tmp_path / "first").run()
