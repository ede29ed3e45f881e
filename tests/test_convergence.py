"""Convergence: what a run measures of itself (`evaluation.convergence`, `run.convergence`), several passes over a
cached slice, and the sweep that chooses the embedded default's budget (`studies.convergence`)."""

import json
from collections import Counter
from unittest.mock import ANY

import pytest
import torch
from conftest import quiet_training_args, tiny_activation_args, tiny_run_data

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.data.cache import ActivationCache
from hf_dmsae.evaluation.convergence import CRITERIA, convergence_record, judged, measured_steps, share_near_init
from hf_dmsae.evaluation.held_out import activation_metrics
from hf_dmsae.reporting.convergence import convergence_report
from hf_dmsae.run.arguments import SAEArguments, new_model
from hf_dmsae.run.convergence import inference_pass
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.run.training import load_trained_model, train_sae
from hf_dmsae.studies.arguments import StudyArguments
from hf_dmsae.studies.convergence import ConvergenceArguments, ConvergenceSweep


def test_the_share_near_init_counts_the_latents_that_kept_their_direction():
    initial = torch.randn(100, 16)
    moved = initial.clone()
    moved[:30] = torch.randn(30, 16)  # 30 latents turned away; the others only rescaled
    assert share_near_init(initial, 3 * initial) == 1.0
    assert share_near_init(initial, moved * 2) == pytest.approx(0.7, abs=0.02)


def test_a_record_judges_each_criterion_and_reads_the_last_fifth_before_the_decay():
    steps, decay = 100, 0.2
    assert measured_steps(steps, decay) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    falling = [
        {"step": s, "heldout_fvu": 1 - s / 200, "train_fvu": 1 - s / 200, "share_near_init": 0.0}
        for s in measured_steps(steps, decay)
    ]
    record = convergence_record(
        falling, steps=100, tokens=1000, epochs=1, decay_fraction=decay, dead_fraction={"in_training": 0.0}
    )
    assert record["fvu_gain_last_fifth"] == pytest.approx((0.7 - 0.6) / 0.7)  # steps 60 → 80, before the decay
    assert not record["converged"] and record["unmet"] == ["fvu_gain_last_fifth"]
    flat = [{**point, "heldout_fvu": 0.3, "train_fvu": 0.3} for point in falling]
    # A latent that fired early in training and died since is dead on the slice's rows at the end: the larger counts;
    # silence on the few rows measured on (a window shorter than a pass) is kept beside, not counted.
    dead = {"in_training": 0.0, "in_inference": 0.2, "on_rows": 0.5}
    record = convergence_record(flat, steps=100, tokens=1000, epochs=1, decay_fraction=decay, dead_fraction=dead)
    assert record["unmet"] == ["dead_fraction"] and record["criteria"] == CRITERIA
    assert record["dead_fraction"] == 0.2 and record["dead_fraction_by"] == dead
    rare = convergence_record(
        flat, steps=100, tokens=1000, epochs=1, decay_fraction=decay, dead_fraction={**dead, "in_inference": 0.01}
    )
    assert rare["converged"] and judged({**rare, "dead_fraction_by": dead}) == record


def test_a_latent_that_fires_on_no_row_is_silent_and_the_pass_reconstructs_as_activation_metrics_does():
    model = DMSAEModel(DMSAEConfig(d_in=16, dict_size=64, k=4))
    with torch.no_grad():
        model.b_enc[:16] = -1e6  # these can never fire
    model.train()
    rows = torch.randn(2000, 16)
    fvu, fired = inference_pass(model, rows, batch_size=300)
    assert (~fired).float().mean() == pytest.approx(16 / 64, abs=1 / 64) and model.training, "its mode given back"
    assert fvu == pytest.approx(activation_metrics(model, rows.split(300))["fvu"], rel=1e-5)  # float32 vs 64 sums
    assert inference_pass(model, torch.empty(0)) == (None, ANY)


def test_a_run_that_cannot_move_is_not_converged_and_one_that_trains_moves(tmp_path, tiny_lm_dir):
    data = tiny_run_data(tmp_path, tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache")))
    piece = data.training_slice("train")
    records = {}
    for name, rate in (("still", 1e-12), ("moving", 0.05)):
        args = quiet_training_args(tmp_path / name, learning_rate=rate, per_device_eval_batch_size=500)
        model = new_model(SAEArguments(dict_size=128, k=8), data, seed=0)
        records[name] = train_sae(model, data, piece, args).convergence
        assert json.loads((tmp_path / name / "convergence.json").read_text()) == records[name]
    still, moving = records["still"], records["moving"]
    assert still["share_near_init"] == 1.0 and "share_near_init" in still["unmet"] and not still["converged"]
    assert moving["share_near_init"] < 0.5
    assert [p["step"] for p in moving["curve"]] == measured_steps(moving["steps"], 0.2)
    assert moving["heldout_fvu"] < still["heldout_fvu"] and moving["epochs"] == 1


def test_a_run_asked_for_passes_reads_its_slice_that_many_times_and_no_other_slice(tmp_path, tiny_lm_dir, monkeypatch):
    activations = tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), num_tokens=2000)
    data = tiny_run_data(tmp_path, activations)
    other = data.training_slice("other", 1000)
    data.finish_slice(other, data.training_data(other, None))  # cached beside it
    piece = data.training_slice("train", 2000)
    reads = []
    original = ActivationCache.__getitems__
    monkeypatch.setattr(
        ActivationCache,
        "__getitems__",
        lambda cache, rows: reads.append((cache.path, list(rows))) or original(cache, rows),
    )
    args = quiet_training_args(tmp_path / "passes", num_train_epochs=3, per_device_train_batch_size=250)
    trainer = train_sae(new_model(SAEArguments(dict_size=128, k=8), data, seed=0), data, piece, args)
    cache = data.training_data(piece, args)
    per_pass = piece.rows // 250
    assert {path for path, _ in reads} == {cache.path}, "no row of another slice"
    assert trainer.state.global_step == 3 * per_pass and trainer.convergence["epochs"] == 3
    counts = Counter(row for _, rows in reads for row in rows)
    assert sum(counts.values()) == 3 * per_pass * 250 and max(counts.values()) == 3
    left_out = piece.rows - per_pass * 250  # a pass reads whole batches: fewer than one is left out of each
    assert sum(3 - counts[row] for row in range(len(cache))) == 3 * left_out
    passes = [[row for _, rows in reads[p * per_pass : (p + 1) * per_pass] for row in rows] for p in range(3)]
    assert passes[0] != passes[1], "each pass in a new order"


def test_passes_are_whole_and_a_stream_refuses_them(tmp_path, tiny_lm_dir):
    with pytest.raises(ValueError, match="num_train_epochs=1.5 is invalid: passes .* are a whole number"):
        DMSAETrainingArguments(output_dir=str(tmp_path), num_train_epochs=1.5)
    with pytest.raises(ValueError, match="num_train_epochs=2 is invalid for a streamed run"):
        tiny_run_data(tmp_path, tiny_activation_args(tiny_lm_dir), num_train_epochs=2)


def test_the_sweep_screens_confirms_the_candidates_and_chooses_resumably(tmp_path, tiny_lm_dir, monkeypatch):
    # Bounds a tiny model can meet, but for the latents' movement, which a learning rate of 1e-12 cannot.
    for name, bound in {"share_near_init": 0.99, "dead_fraction": 1.01, "fvu_gain_last_fifth": 10.0}.items():
        monkeypatch.setitem(CRITERIA, name, bound)
    monkeypatch.setitem(CRITERIA, "overfit_gap", 10.0)
    sweep = tmp_path / "sweep.json"
    settings = [
        {"name": "still", "learning_rate": 1e-12},
        {
            "name": "fast",
            "learning_rate": 0.01,
            "num_train_epochs": 2,
            "dead_tokens_threshold": 400,
            "dead_latent_loss": "ghost_grads",
            "aux_k": 3,
            "adam_beta1": 0.5,
            "decay_fraction": 0.4,
        },
    ]
    sweep.write_text(json.dumps(settings))
    arguments = (
        ConvergenceArguments(sweep=str(sweep), study_dir=str(tmp_path / "runs"), screen_k=8, candidates=1, core_size=4),
        StudyArguments(
            seeds=[0, 1],
            ks=[4, 8],
            variants=["matryoshka", "random_dense_core"],
            ce_batches=1,
            results_dir=str(tmp_path / "report"),
        ),
        SAEArguments(dict_size=64, k=8),
        tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), num_tokens=1000),
        quiet_training_args(tmp_path / "unused", per_device_train_batch_size=100),
    )
    results = ConvergenceSweep(*arguments).run()
    models = results["models"]
    screened = {key for key in models if key.endswith("seed0") and "/k8-" in key}
    assert {"still/k8-matryoshka/seed0", "still/k8-random_dense_core/seed0"} <= screened
    assert not models["still/k8-matryoshka/seed0"]["convergence"]["converged"]  # never a candidate
    assert all(m["overrides"] == {"learning_rate": 1e-12} for k, m in models.items() if k.startswith("still/"))
    assert results["candidates"] == ["fast"]
    confirmed = {f"fast/k{k}-{v}/seed{s}" for k in (4, 8) for v in ("matryoshka", "random_dense_core") for s in (0, 1)}
    assert confirmed <= set(models) and set(results["matched"]) == {key.rsplit("/", 1)[0] for key in confirmed}
    assert models["fast-twice/k8-matryoshka/seed0"]["convergence"]["epochs"] == 4
    assert set(results["twice"]) == {"fast/k8-matryoshka", "fast/k8-random_dense_core"}
    gains = [t["fvu_gain"] for t in results["twice"].values()]
    assert results["chosen"]["setting"] == ("fast" if max(gains) < 0.03 else None)
    assert models["fast/k4-random_dense_core/seed1"]["convergence"]["steps"] == 2 * (1000 // 100)
    fast = tmp_path / "runs" / "fast" / "k8-matryoshka" / "seed0"
    config = load_trained_model(fast).config
    assert (config.aux_k, config.dead_latent_loss) == (3, "ghost_grads")  # SAE settings
    training = torch.load(fast / "training_args.bin", weights_only=False)
    assert (training.adam_beta1, training.decay_fraction) == (0.5, 0.4)  # training settings
    report = convergence_report(tmp_path / "report")
    assert "| fast | random_dense_core | 4 | 1 |" in report and "## Twice the passes" in report
    before = (tmp_path / "report" / "results.json").read_text()
    assert ConvergenceSweep(*arguments).run() == json.loads(before)  # nothing trained again
    # A record from before dead latents were counted in inference mode over a pass gets the count from its model.
    recorded = json.loads(before)
    for record in recorded["models"].values():
        del record["convergence"]["dead_fraction_by"]["in_inference"]
    (tmp_path / "report" / "results.json").write_text(json.dumps(recorded))
    assert ConvergenceSweep(*arguments).run() == json.loads(before)
    settings[0]["learning_rate"] = 1e-3
    sweep.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="still/k8-matryoshka/seed0 was trained at"):
        ConvergenceSweep(*arguments).run()
