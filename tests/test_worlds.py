import json

import pytest
import torch
from conftest import results_written_by_another_study

from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.reporting.worlds import worlds_report
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.launch import parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.studies.arguments import StudyArguments
from hf_dmsae.studies.synthetic_world import SyntheticArguments, SyntheticWorld
from hf_dmsae.studies.worlds import (
    WorldFamily,
    WorldFamilyArguments,
    draw_world,
    ranks,
    signs,
    spearman,
    world_properties,
)

TINY_WORLD = dict(num_features=64, hidden_dim=32, root_features=2, correlation_rank=4, readout_classes=5)


def test_rank_correlation_and_sign_shares():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]  # ties share their mean rank
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # any monotone relation
    assert spearman([1, 2, 3, 4], [5, 3, 2, 0]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    assert signs([0.1, -0.2, 0.0, 0.3]) == {"positive": 0.5, "negative": 0.25, "zero": 0.25}


def test_worlds_are_drawn_within_their_ranges_the_same_each_time_and_the_task_can_prefer_rare_features():
    family = WorldFamilyArguments(num_worlds=6, features_per_dim_range=[1.0, 2.0], root_features_range=[0, 3])
    base = SyntheticArguments(**TINY_WORLD)
    worlds = [draw_world(family, base, i) for i in range(6)]
    assert worlds == [draw_world(family, base, i) for i in range(6)]
    assert worlds != [draw_world(WorldFamilyArguments(family_seed=1), base, i) for i in range(6)]
    assert [w["useful_by"] for w in worlds] == ["random", "frequent", "rare"] * 2
    for w in worlds:
        assert 32 <= w["num_features"] <= 64 and w["dict_size"] == w["num_features"] and 0 <= w["root_features"] <= 3
        assert (
            2 <= w["hierarchy_depth"] <= 3 and 0 <= w["correlation_scale"] <= 0.3 and 0.3 <= w["zipf_exponent"] <= 1.2
        )
    correlations = {}
    for useful_by in ("frequent", "rare", "random"):
        world = SyntheticWorld(SyntheticArguments(**TINY_WORLD, useful_by=useful_by))
        measured = (world.sample(65_536, seed=9)[1] > 0).float().mean(0)  # marginal, not the generator's conditional
        torch.testing.assert_close(world.firing_frequencies, measured, rtol=0, atol=0.01)
        order = world.firing_frequencies.argsort(descending=useful_by == "frequent", stable=True)
        if useful_by != "random":
            assert torch.equal(world.useful, order[:16].sort().values)
        correlations[useful_by] = world_properties(world)["useful_frequency_correlation"]
    assert correlations["frequent"] > 0.5 > abs(correlations["random"]) and correlations["rare"] < -0.5
    with pytest.raises(ValueError, match="useful_by_turns"):
        WorldFamilyArguments(useful_by_turns=["often"])
    with pytest.raises(ValueError, match="features_per_dim_range"):
        WorldFamilyArguments(features_per_dim_range=[3.0, 1.0])


def test_a_family_screens_benchmarks_and_reports_every_world_and_resumes(tmp_path):
    config = {
        **TINY_WORLD,
        "num_worlds": 1,
        "features_per_dim_range": [1.5, 2.0],
        "root_features_range": [0, 2],
        "mcc_floor": 0.0,
        "useful_by_turns": ["rare", "random"],
        "family_dir": str(tmp_path / "family"),
        "results_dir": str(tmp_path / "kept"),
        "seeds": [0, 1],
        "num_cycles": 1,
        "ks": [4],
        "matryoshka_ks": [8],
        "variants": ["sparse_core", "matryoshka"],
        "train_rows": 4096,
        "eval_rows": 2048,
        "k": 4,
        "group_fractions": [0.25, 0.25, 0.25],
        "dead_tokens_threshold": 2048,
        "attribution_tokens": 2048,
        "q": 0.95,
        "output_dir": str(tmp_path / "unused"),
        "per_device_train_batch_size": 512,
        "learning_rate": 0.003,
        "save_steps": 8,
        "report_to": "none",
    }
    (tmp_path / "worlds.json").write_text(json.dumps(config))
    types = (WorldFamilyArguments, StudyArguments, SyntheticArguments, SAEArguments, AttributionArguments)
    types += (DMSAETrainingArguments,)
    arguments = parse_arguments(types, [str(tmp_path / "worlds.json")])
    results = WorldFamily(*arguments).run()

    world = results["worlds"]["world0"]
    assert world["kept"] and 0 < world["screen_mcc"] <= 1 and world["settings"]["num_features"] >= 48
    assert world["settings"]["useful_by"] == "rare" and world["properties"]["useful_frequency_correlation"] < 0
    summary = world["summary"]
    assert len(summary["selection"]["distilled"]["attribution"]["precision"]) == 2  # one per seed
    assert set(summary["transfer"]) == {"k4-sparse_core", "k4-matryoshka", "k8-matryoshka"}
    assert len(summary["matched"]["sparse_core"]["k4"]["mcc"]) == 2  # on each seed's Matryoshka curve (k 4 to 8)
    benchmark = json.loads((tmp_path / "family" / "world0" / "benchmark" / "results.json").read_text())
    assert benchmark["identity"]["synthetic"]["num_features"] == world["settings"]["num_features"]
    assert benchmark["identity"]["sae"]["dict_size"] == world["settings"]["num_features"]
    across = results["across_worlds"]
    assert across["worlds"] == ["world0"] and len(across["attribution_r_precision"]) == 1
    assert json.loads((tmp_path / "kept" / "world0" / "results.json").read_text()) == benchmark  # its own report's
    report = worlds_report(tmp_path / "kept")
    assert "1 kept, 0 skipped" in report and "## What goes with attribution beating chance" in report
    assert (tmp_path / "kept" / "figures" / "r_precision_vs_properties.png").read_bytes().startswith(b"\x89PNG")

    weights = tmp_path / "family" / "world0" / "screen" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert WorldFamily(*arguments).run() == results and weights.stat().st_mtime_ns == before  # nothing redone
    # The same worlds under a floor no SAE reaches: each is screened (by the model already trained) and skipped.
    strict = parse_arguments(types, [str(tmp_path / "worlds.json"), "--mcc_floor", "1.0", "--num_worlds", "2"])
    strict[1].results_dir = str(tmp_path / "strict")
    skipped = WorldFamily(*strict).run()
    assert weights.stat().st_mtime_ns == before
    assert not any(w["kept"] for w in skipped["worlds"].values()) and skipped["across_worlds"]["worlds"] == []
    assert "0 kept, 2 skipped (world0, world1)" in worlds_report(tmp_path / "strict")


def test_a_family_refuses_a_results_file_in_use_or_damaged_naming_it(tmp_path):
    arguments = (
        WorldFamilyArguments(num_worlds=1, family_dir=str(tmp_path / "family")),
        StudyArguments(seeds=[0, 1], ks=[4], results_dir=str(tmp_path / "kept")),
        SyntheticArguments(**TINY_WORLD),
        SAEArguments(),
        AttributionArguments(),
        DMSAETrainingArguments(output_dir=str(tmp_path / "unused"), report_to="none"),
    )
    with results_written_by_another_study(tmp_path / "kept" / "results.json"):
        with pytest.raises(RuntimeError, match=r"kept/results.json is being written by another study"):
            WorldFamily(*arguments).run()
    (tmp_path / "kept" / "results.json").write_text(json.dumps([{"world0": {}}]))
    with pytest.raises(ValueError, match=r"kept/results.json holds a JSON list, not an object; restore it"):
        WorldFamily(*arguments).run()
    with pytest.raises(ValueError, match=r"kept/results.json holds a JSON list"):
        worlds_report(tmp_path / "kept")
    assert not (tmp_path / "family").exists()
