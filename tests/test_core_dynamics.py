import dataclasses
import json
import math

import pytest
import torch
from test_synthetic import TINY_WORLD

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.data.activations import ActivationArguments
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import Distillation, DistillationArguments
from hf_dmsae.model.core import DMSAECore
from hf_dmsae.reporting.core_dynamics import core_dynamics_report, decay_start
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.run.training import load_trained_model
from hf_dmsae.studies.arguments import StudyArguments, StudySourceArguments
from hf_dmsae.studies.core_dynamics import (
    ABLATIONS,
    CoreDynamics,
    CoreDynamicsArguments,
    core_geometry,
    principal_directions,
)
from hf_dmsae.studies.synthetic_world import SyntheticArguments, SyntheticSource, SyntheticWorld

SYNTHETIC = StudySourceArguments(study_source="synthetic")
SAE = dict(dict_size=64, k=4, group_fractions=[0.25, 0.25, 0.25], dead_tokens_threshold=4096)


def training(folder, **overrides) -> DMSAETrainingArguments:
    settings = dict(
        output_dir=str(folder),
        per_device_train_batch_size=256,
        learning_rate=0.01,
        save_steps=8,
        report_to="none",
        disable_tqdm=True,
        calibrate_threshold_rows=1024,
        init_decoder_bias_rows=1024,
    )
    return DMSAETrainingArguments(**{**settings, **overrides})


@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory):
    """Two seeds' distillations in a tiny synthetic world, then the study: every core at two budgets, every
    ablation at the smaller one (seed 0)."""
    root = tmp_path_factory.mktemp("dynamics")
    world_args = SyntheticArguments(**TINY_WORLD, eval_rows=2048)
    world = SyntheticWorld(world_args)
    for seed in (0, 1):
        source = SyntheticSource(world, 4096, 2048, seed)
        Distillation(
            DistillationArguments(num_cycles=1),
            SAEArguments(**SAE),
            None,
            AttributionArguments(attribution_tokens=2048, q=0.95),
            training(root / f"seed{seed}" / "distillation", seed=seed),
            source=source,
        ).run()
    study = CoreDynamicsArguments(
        budgets=[2048, 4096],
        cores=["distilled", "random_init", "none"],
        ablations=list(ABLATIONS)[1:],
        ablation_budget=2048,
        ablation_seeds=[0],
        top_components=4,
        geometry_rows=1024,
    )
    arguments = (study, SYNTHETIC, StudyArguments(seeds=[0, 1]), SAEArguments(**SAE), None, world_args)
    arguments += (training(root, per_device_train_batch_size=128),)
    return root, arguments, CoreDynamics(*arguments).run(), world


def test_the_study_trains_every_core_budget_seed_and_ablation_as_planned(synthetic_study):
    root, arguments, results, _ = synthetic_study
    runs = {(r["seed"], r["ablation"], r["core"], r["budget"]): r for r in results["runs"]}
    for seed in (0, 1):
        for core in ("distilled", "random_init", "none"):
            for budget in (2048, 4096):
                run = runs[seed, "paper", core, budget]
                assert run["steps"] == budget // 128
                assert len(run["l0_core_curve"]) == (run["steps"] if core != "none" else 0)
                assert 0 <= run["metrics"]["eval_fvu"] < 1
    ablated = {(a, c) for s, a, c, _ in runs if a != "paper"}
    assert {s for s, a, _, _ in runs if a != "paper"} == {0}
    assert ablated == {
        (a, c)
        for a in list(ABLATIONS)[1:]
        for c in ("distilled", ABLATIONS[a].random_core)
        if ABLATIONS[a].overrides or c != "distilled"
    }

    distilled = DMSAECore.from_pretrained(root / "seed0" / "distillation" / "distilled-core")
    study = root / "core-dynamics" / "seed0"
    paper = load_trained_model(study / "paper" / "distilled-b2048")
    assert torch.equal(paper.W_enc_frozen, distilled.encoder_rows)
    assert runs[0, "paper", "distilled", 2048]["core_size"] == len(distilled)
    assert paper.b_enc[: len(distilled)].any() and (paper.W_dec.norm(dim=1) - 1).abs().max() < 1e-5
    frozen = load_trained_model(study / "core_bias_frozen" / "distilled-b2048")
    assert not frozen.b_enc[: len(distilled)].any() and frozen.b_enc[len(distilled) :].any()
    assert not load_trained_model(study / "biases_frozen" / "random_init-b2048").b_enc[: len(distilled)].any()
    free = load_trained_model(study / "free_decoder_norm" / "distilled-b2048")
    assert (free.W_dec.norm(dim=1) - 1).abs().max() > 1e-3
    assert load_trained_model(study / "loss_over_groups_squared" / "distilled-b2048").config.prefix_loss_weighting == (
        "dictionary_learning"
    )
    lr = {a: [v for _, v in runs[0, a, "distilled", 2048]["learning_rate_curve"]] for a in ("paper", "no_lr_decay")}
    assert lr["paper"][-1] < 0.5 * max(lr["paper"]) and lr["no_lr_decay"][-1] == max(lr["no_lr_decay"])


def test_the_random_trained_core_holds_the_distillation_controls_trained_rows(synthetic_study):
    from hf_dmsae.method.distillation import control_cores

    root, arguments, _, _ = synthetic_study
    study = dataclasses.replace(arguments[0], cores=["distilled", "random_trained"])
    distilled = DMSAECore.from_pretrained(root / "seed0" / "distillation" / "distilled-core")
    x = torch.randn(64, distilled.encoder_rows.shape[1])
    cores = CoreDynamics(study, *arguments[1:]).cores(distilled, 0, x)
    last = load_trained_model(root / "seed0" / "distillation" / "cycle1")
    expected = control_cores(distilled, x.shape[1], 0, last)["random_trained"]
    assert torch.equal(cores["random_trained"].encoder_rows, expected.encoder_rows)
    assert not set(cores["random_trained"].latent_ids) & set(distilled.latent_ids)


def test_the_off_top_random_core_is_orthogonal_to_the_top_principal_components(synthetic_study):
    root, _, _, world = synthetic_study
    source = SyntheticSource(world, 2048, 2048, 0)
    x = torch.cat(list(source.eval_batches(4096)))[:1024] / source.sae_fields()["norm_factor"]
    top = principal_directions(x, 4)
    rows = load_trained_model(
        root / "core-dynamics" / "seed0" / "random_core_off_top" / "random_off_top-b2048"
    ).W_enc_frozen
    assert (rows @ top.T).abs().max() < 1e-5
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(rows)))
    isotropic = load_trained_model(root / "core-dynamics" / "seed0" / "paper" / "random_init-b2048").W_enc_frozen
    assert (isotropic @ top.T).abs().max() > 0.1


def test_the_study_resumes_without_retraining_reports_and_refuses_other_settings(synthetic_study):
    root, arguments, results, _ = synthetic_study
    weights = root / "core-dynamics" / "seed1" / "paper" / "distilled-b4096" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert CoreDynamics(*arguments).run() == json.loads(json.dumps(results)) and weights.stat().st_mtime_ns == before
    report = core_dynamics_report(root / "core-dynamics")
    assert "| 4096 | random_init | 1 | 32 |" in report and "| core_bias_frozen | distilled | 1 |" in report
    assert all(f"| {name} |" in report for name in ABLATIONS)
    for figure in ("l0_core_by_budget", "ablations"):
        assert (root / "core-dynamics" / "figures" / f"{figure}.png").read_bytes().startswith(b"\x89PNG")
    study, *rest = arguments
    other = CoreDynamicsArguments(**{**study.__dict__, "top_components": 3})
    with pytest.raises(ValueError, match="other settings"):
        CoreDynamics(other, *rest).run()
    missing = CoreDynamicsArguments(**{**study.__dict__, "distillation_dir": str(root / "nothing")})
    with pytest.raises(FileNotFoundError, match="run it first"):
        CoreDynamics(missing, *rest).run()


def test_bad_study_arguments_are_refused():
    with pytest.raises(ValueError, match="cores"):
        CoreDynamicsArguments(cores=["distilled", "trained"])
    with pytest.raises(ValueError, match="ablations"):
        CoreDynamicsArguments(ablations=["no_such_thing"])
    with pytest.raises(ValueError, match="budgets"):
        CoreDynamicsArguments(budgets=[])
    with pytest.raises(ValueError, match="activation_cache"):
        CoreDynamics(
            CoreDynamicsArguments(),
            StudySourceArguments(),
            StudyArguments(),
            SAEArguments(),
            ActivationArguments(),
            None,
            DMSAETrainingArguments(output_dir="unused"),
        )


def test_a_run_planned_twice_is_planned_once(tmp_path):
    """The `paper` ablation's random core at a study budget is that budget's random-core run, not a second one."""
    study = CoreDynamicsArguments(budgets=[2048, 4096], cores=["distilled", "random_init"], ablations=["paper"])
    world = SyntheticArguments(**TINY_WORLD)
    seeds = StudyArguments()
    plan = CoreDynamics(study, SYNTHETIC, seeds, SAEArguments(**SAE), None, world, training(tmp_path)).plan(seed=0)
    assert [run.name for run in plan] == [
        "paper/distilled-b2048",
        "paper/random_init-b2048",
        "paper/distilled-b4096",
        "paper/random_init-b4096",
    ]


def test_core_geometry_measures_firing_spread_and_variance_along_the_core():
    config = DMSAEConfig(d_in=4, dict_size=8, core_size=2, k=2, core_ids=["a", "b"])
    model = DMSAEModel.from_core(config, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, 4, generator=generator) * torch.tensor([3.0, 1, 1, 1]) + torch.tensor([0.0, 1, 0, 0])
    geometry = core_geometry(model, x)
    # Variances 9, 1, 1, 1: 3 per direction on average; the rows read 9 and 1.
    assert geometry["variance_ratio"] == pytest.approx((9 / 3 + 1 / 3) / 2, rel=0.02)
    # b_dec = 0, b_enc = 0: latent a fires on half the rows, latent b where N(1, 1) > 0 (84%).
    assert geometry["firing"] == pytest.approx((0.5 + 0.8413) / 2, abs=0.01)
    assert geometry["mean_preactivation_in_std"] == pytest.approx((0 + 1) / 2, abs=0.02)
    assert geometry["mean_direction_cos"] == pytest.approx((0 + 1) / 2, abs=0.02)


def test_the_decay_phase_starts_at_the_first_step_below_the_peak_after_warm_up():
    assert decay_start([[1, 0.0], [2, 0.01], [3, 0.01], [4, 0.005], [5, 0.001]]) == 4
    assert decay_start([[1, 0.0], [2, 0.01], [3, 0.01]]) is None


def test_every_cored_run_records_fig3_counted_three_ways_over_training(synthetic_study):
    root, _, results, _ = synthetic_study
    for run in results["runs"]:
        if not run["core_size"]:
            assert run["core_usage_curve"] == [] and run["core_usage"] == {}
            continue
        curve = run["core_usage_curve"]
        assert [e["step"] for e in curve] == [step for step, _ in run["l0_core_curve"]]
        for entry in curve:
            assert 0 <= entry["core_energy_share"] and 0 <= entry["l0_core_positive"] <= run["core_size"]
            assert entry.get("l0_core_above_threshold", 0) <= entry["l0_core_positive"]
        assert math.isfinite(run["core_usage"]["fvu_without_core"]) and 0 < run["core_usage"]["fvu"] < 1
    report = core_dynamics_report(root / "core-dynamics")
    assert "## Fig. 3 counted three ways" in report and "figures/core_countings.png" in report
