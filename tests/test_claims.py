import dataclasses
import json
import math
import shutil

import pytest
import torch
from conftest import (
    core_of_rows,
    quiet_training_args,
    results_written_by_another_study,
    tiny_activation_args,
    tiny_model,
)

from hf_dmsae.evaluation.saebench import SAEBenchArguments
from hf_dmsae.reporting.claims import claims_report
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.training import load_trained_model
from hf_dmsae.studies.arguments import StudyArguments
from hf_dmsae.studies.claims import ClaimsArguments, PaperClaims, interpolate_in_log_l0, matched_differences


def finished_distillation(folder, seed: int = 0):
    """What a finished distillation records of its distilled core (6 rows of the tiny LM's width), in `folder`."""
    core = core_of_rows(torch.randn(6, 32, generator=torch.Generator().manual_seed(seed)) / 6, cycle=2)
    core.save_pretrained(folder / "distilled-core")
    record = {"core": "distilled-core", "core_digest": core.digest(), "size": 6, "last_cycle": 2}
    (folder / "state.json").write_text(json.dumps({"distilled": record}))


def study_arguments(tmp_path, tiny_lm_dir):
    """A study of two seeds, three variants and three ks around `finished_distillation(tmp_path / "distillation")`,
    trained for 4 steps."""
    return (
        ClaimsArguments(
            distillation_dir=str(tmp_path / "distillation"), study_dir=str(tmp_path / "study"), consistency_k=8
        ),
        StudyArguments(
            results_dir=str(tmp_path / "results"),
            seeds=[0, 1],
            ks=[4, 8],
            variants=["dense_core", "matryoshka", "random_sparse_core"],
            matryoshka_ks=[16],
            ce_batches=0,
        ),
        SAEArguments(dict_size=128, k=8),
        tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), num_tokens=2000),
        quiet_training_args(tmp_path / "unused", max_steps=4),
        SAEBenchArguments(saebench_evals=["autointerp"]),
    )


def changed(arguments: tuple, sae: SAEArguments | None = None, **study) -> tuple:
    """`arguments` with some of the study's settings changed, and another SAE."""
    claims, settings, own_sae, *rest = arguments
    return (claims, dataclasses.replace(settings, **study), sae or own_sae, *rest)


def test_a_value_at_matched_l0_is_read_linearly_in_log_l0_and_never_extrapolated():
    curve = [(64.0, 0.2), (16.0, 0.4), (32.0, 0.3)]
    assert interpolate_in_log_l0(curve, 16.0) == 0.4 and interpolate_in_log_l0(curve, 64.0) == 0.2
    assert interpolate_in_log_l0(curve, math.sqrt(16 * 32)) == pytest.approx(0.35, abs=1e-12)
    # BatchTopK's L0 is k give or take a few hundredths: just beyond an end (2%) is the end, farther is nothing.
    assert interpolate_in_log_l0(curve, 15.9) == 0.4 and interpolate_in_log_l0(curve, 65.0) == 0.2
    assert interpolate_in_log_l0(curve, 15.6) is None and interpolate_in_log_l0(curve, 65.5) is None
    assert interpolate_in_log_l0([], 16.0) is None


def test_each_variant_is_compared_with_its_own_seeds_matryoshka_curve_at_its_measured_l0():
    def model(k, variant, l0, fvu):
        return {"k": k, "variant": variant, "l0": l0, "fvu": fvu}

    models = {
        "seed0": {
            "a": model(16, "matryoshka", 16.0, 0.4),
            "b": model(64, "matryoshka", 64.0, 0.2),
            "c": model(16, "dense_core", 32.0, 0.25),  # Matryoshka at L0 32 (halfway in log): 0.3
            "d": model(64, "dense_core", 90.0, 0.1),  # beyond seed 0's Matryoshka curve
        },
        "seed1": {
            "a": model(16, "matryoshka", 16.0, 0.5),
            "b": model(128, "matryoshka", 128.0, 0.2),
            "c": model(16, "dense_core", 32.0, 0.35),  # Matryoshka at L0 32 (a third in log): 0.4
            "d": model(64, "dense_core", 90.0, 0.1),
        },
    }
    matched = matched_differences(models, ["dense_core", "matryoshka"])
    assert matched["dense_core"]["k16"]["l0"] == [32.0, 32.0]
    assert matched["dense_core"]["k16"]["fvu"] == pytest.approx([-0.05, -0.05], abs=1e-12)
    assert matched["dense_core"]["k64"]["fvu"] == pytest.approx([0.1 - (0.5 - 0.3 * math.log(90 / 16) / math.log(8))])
    assert set(matched) == {"dense_core"}


def test_each_seed_transfers_its_own_distillations_core_and_the_cores_are_compared_across_seeds(tiny_lm_dir, tmp_path):
    from hf_dmsae.method.distillation import control_cores
    from hf_dmsae.run.trainer import CHECKSUMS
    from hf_dmsae.run.training import MODEL_FILES
    from hf_dmsae.utils.integrity import checksums, write_json_atomically

    lasts = {}
    for seed in (0, 1):
        folder = tmp_path / f"distillation-seed{seed}"
        finished_distillation(folder, seed)
        core_ids = [f"cycle2:{i}" for i in range(6)]
        lasts[seed] = tiny_model(seed, d_in=32, dict_size=64, core_size=6, core_ids=core_ids, cycle=2)
        lasts[seed].save_pretrained(folder / "cycle2")  # the last cycle, as a finished run saves it
        write_json_atomically(folder / "cycle2" / CHECKSUMS, checksums(folder / "cycle2", list(MODEL_FILES)))
    claims, study, *rest = study_arguments(tmp_path, tiny_lm_dir)
    claims = dataclasses.replace(claims, distillation_dir=str(tmp_path / "distillation-seed{seed}"))
    study = dataclasses.replace(study, ks=[8], variants=["dense_core", "matryoshka", "trained_sparse_core"])
    study = dataclasses.replace(study, matryoshka_ks=[])
    results = PaperClaims(claims, study, *rest[:-1]).run()
    assert set(results["cores"]) == {"seed0", "seed1"} and "core" not in results
    for seed in (0, 1):
        model = load_trained_model(tmp_path / "study" / f"seed{seed}" / "transfer" / "k8-dense_core")
        core = PaperClaims(claims, study, *rest[:-1]).cores[seed][1]
        assert torch.equal(model.W_enc_frozen, core.encoder_rows)
        assert results["cores"][f"seed{seed}"]["digest"] == core.digest()
        control = load_trained_model(tmp_path / "study" / f"seed{seed}" / "transfer" / "k8-trained_sparse_core")
        expected = control_cores(core, 32, seed, lasts[seed])["random_trained"]
        assert torch.equal(control.W_enc_frozen, expected.encoder_rows)
    overlap = results["core_overlap"]
    assert overlap["seeds"] == [0, 1] and overlap["sizes"] == [6, 6]
    assert len(overlap["distilled"]) == len(overlap["random_trained"]) == 2
    assert all(0 <= share <= 1 for share in overlap["distilled"] + overlap["random_trained"])
    assert "## Claim 1: the same core from every seed" in claims_report(tmp_path / "results")


def test_the_study_trains_every_variant_per_seed_on_the_same_tokens_compares_and_resumes(
    tiny_lm_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # SAEBench's autointerp: recorded as skipped, at once
    distillation = tmp_path / "distillation"
    finished_distillation(distillation)
    arguments = study_arguments(tmp_path, tiny_lm_dir)
    results = PaperClaims(*arguments).run()

    names = {"k4-dense_core", "k8-dense_core", "k4-matryoshka", "k8-matryoshka", "k16-matryoshka"}
    names |= {"k4-random_sparse_core", "k8-random_sparse_core"}
    assert set(results["models"]) == {"seed0", "seed1"} and all(set(m) == names for m in results["models"].values())
    saebench = [model["saebench"] for models in results["models"].values() for model in models.values()]
    assert len(saebench) == 14 and all("OPENAI_API_KEY" in s["autointerp"]["skipped"] for s in saebench)
    slices_of = {}
    for seed in (0, 1):
        states = [tmp_path / "study" / f"seed{seed}" / run / "state.json" for run in ("transfer", "matryoshka-wide")]
        slices = [json.loads(path.read_text())["slices"] for path in states]
        assert slices[0] == slices[1]  # the Matryoshka SAE's further k read the same tokens as every variant
        slices_of[seed] = slices[0]
    seed0 = load_trained_model(tmp_path / "study" / "seed0" / "transfer" / "k8-dense_core")
    seed1 = load_trained_model(tmp_path / "study" / "seed1" / "transfer" / "k8-dense_core")
    assert torch.equal(seed0.W_enc_frozen, seed1.W_enc_frozen) and not torch.equal(seed0.W_dec, seed1.W_dec)

    matched = results["matched"]
    assert set(matched) == {"dense_core", "random_sparse_core"}
    for row in matched["random_sparse_core"].values():
        assert len(row["l0"]) == 2 and all(-1 < d < 1 for d in row.get("fvu", []))
    matches = results["latent_matches"]["variants"]
    assert all(0 <= share <= 1 for share in matches["dense_core"]["same_seed"]["k8"]["noncore"])
    assert matches["matryoshka"]["same_seed"]["k8"]["core"] == [None, None]  # it has no core
    assert len(matches["dense_core"]["across_seeds"]["noncore"]) == 2  # both ways
    assert all(0 <= share <= 1 for share in matches["random_sparse_core"]["initial"]["noncore"])
    report = claims_report(tmp_path / "results")
    assert "| 8 | dense_core |" in report and "Δ fvu" in report and "across seeds (k 8)" in report
    assert (tmp_path / "results" / "figures" / "metrics_vs_l0.png").read_bytes().startswith(b"\x89PNG")

    weights = tmp_path / "study" / "seed1" / "transfer" / "k8-dense_core" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert PaperClaims(*arguments).run() == json.loads(json.dumps(results))
    assert weights.stat().st_mtime_ns == before  # nothing retrained
    # On another machine, from the committed results alone: nothing recorded is redone, and only a seed with
    # something left (here, the comparison of latents) is trained again, as it was.
    shutil.rmtree(tmp_path / "study")
    committed = json.loads((tmp_path / "results" / "results.json").read_text())
    del committed["latent_matches"]
    committed["models"]["seed1"]["k4-dense_core"]["saebench"] = {"autointerp": {"skipped": "on the other machine"}}
    (tmp_path / "results" / "results.json").write_text(json.dumps(committed))
    rerun = PaperClaims(*arguments).run()
    assert rerun["models"]["seed1"]["k4-dense_core"]["saebench"]["autointerp"]["skipped"] == "on the other machine"
    rerun["models"]["seed1"]["k4-dense_core"]["saebench"] = results["models"]["seed1"]["k4-dense_core"]["saebench"]
    assert rerun == json.loads(json.dumps(results))  # the retrained models match the first ones
    retrained = sorted(p.name for p in (tmp_path / "study" / "seed0" / "transfer").glob("k*"))
    assert len(retrained) == 6
    with pytest.raises(ValueError, match="other settings"):
        PaperClaims(*changed(arguments, latent_match_cos=0.5)).run()
    # A variant added to the finished study: its models alone are trained, on the seeds' same tokens, and the
    # comparisons include it.
    before, recorded = weights.stat().st_mtime_ns, json.loads((tmp_path / "results" / "results.json").read_text())
    variants = [*arguments[1].variants, "learned_linear_core"]
    extended = PaperClaims(*changed(arguments, variants=variants)).run()
    added = {"k4-learned_linear_core", "k8-learned_linear_core"}
    assert all(set(m) == names | added for m in extended["models"].values())
    assert all(extended["models"][s][n] == recorded["models"][s][n] for s in recorded["models"] for n in names)
    assert weights.stat().st_mtime_ns == before
    assert (
        "learned_linear_core" in extended["matched"] and "learned_linear_core" in extended["latent_matches"]["variants"]
    )
    for seed in (0, 1):
        state = json.loads((tmp_path / "study" / f"seed{seed}" / "transfer" / "state.json").read_text())
        assert state["slices"] == slices_of[seed]
    # A variant and a Matryoshka k added on another machine (nothing but the committed results): their models alone
    # are trained, and the latents of the variants compared before are not compared again.
    shutil.rmtree(tmp_path / "study")
    wider = {"variants": [*variants, "sparse_core"], "matryoshka_ks": [16, 32]}
    widened = PaperClaims(*changed(arguments, **wider)).run()
    trained = sorted(str(p.relative_to(tmp_path / "study")) for p in (tmp_path / "study").glob("seed*/*/k*"))
    new_models = ["matryoshka-wide/k32-matryoshka", "transfer/k4-sparse_core", "transfer/k8-sparse_core"]
    assert trained == [f"seed{s}/{m}" for s in (0, 1) for m in new_models]
    assert all(widened["models"][s][n] == extended["models"][s][n] for s in recorded["models"] for n in names)
    assert all("saebench" in widened["models"][s]["k32-matryoshka"] for s in ("seed0", "seed1"))
    matches = widened["latent_matches"]["variants"]
    assert set(matches) == {*variants, "sparse_core"}
    assert all(matches[v] == extended["latent_matches"]["variants"][v] for v in variants)
    # A penalized core added at a coefficient of its own (the study's other models do not read it): recorded per
    # variant, and refused at another while the variant has models left to train.
    shutil.rmtree(tmp_path / "study")
    wider["variants"] = [*wider["variants"], "penalized_core"]
    at = {c: dataclasses.replace(arguments[2], core_sparsity_coef=c) for c in (0.5, 0.1)}
    penalized = PaperClaims(*changed(arguments, at[0.5], **wider)).run()
    assert penalized["variant_settings"] == {"penalized_core": {"core_sparsity_coef": 0.5}}
    assert "`penalized_core` at core_sparsity_coef 0.5." in claims_report(tmp_path / "results")
    assert all(penalized["models"][s][n] == widened["models"][s][n] for s in recorded["models"] for n in names)
    interrupted = json.loads((tmp_path / "results" / "results.json").read_text())
    del interrupted["models"]["seed1"]["k8-penalized_core"]
    (tmp_path / "results" / "results.json").write_text(json.dumps(interrupted))
    with pytest.raises(ValueError, match=r"seed1/k8-penalized_core \(recorded \{'core_sparsity_coef': 0.5\}"):
        PaperClaims(*changed(arguments, at[0.1], **wider)).run()
    PaperClaims(*changed(arguments, at[0.5], **wider)).run()  # the same coefficient: the model is trained again
    # The distillation run again on another machine, selecting other rows: the models that read the core's size
    # alone may still be added; one built around its rows is refused, before anything trains.
    shutil.rmtree(tmp_path / "study")
    finished_distillation(distillation, seed=1)
    wider["matryoshka_ks"] = [16, 32, 64]
    with pytest.raises(ValueError, match=r"finished models were trained at other settings: penalized_core \(recorded"):
        PaperClaims(*changed(arguments, **wider)).run()  # the default 0.01
    PaperClaims(*changed(arguments, at[0.5], **wider)).run()
    assert (tmp_path / "study" / "seed1" / "matryoshka-wide" / "k64-matryoshka").is_dir()
    wider["variants"] = [*wider["variants"], "jumprelu_core"]
    with pytest.raises(ValueError, match="seed0/k4-jumprelu_core, seed0/k8-jumprelu_core, seed1/k4-jumprelu_core"):
        PaperClaims(*changed(arguments, at[0.5], **wider)).run()


def test_a_second_study_on_a_results_folder_in_use_is_refused_naming_it(tiny_lm_dir, tmp_path):
    """Two studies on one results folder (say `--seeds 0` and `--seeds 1`) would each rewrite `results.json` whole
    with only their own seeds: the second is refused before it trains anything."""
    finished_distillation(tmp_path / "distillation")
    with results_written_by_another_study(tmp_path / "results" / "results.json"):
        with pytest.raises(RuntimeError, match=r"results/results.json is being written by another study"):
            PaperClaims(*study_arguments(tmp_path, tiny_lm_dir)).run()
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda r: [r], "holds a JSON list, not an object; restore it from its commit"),
        (lambda r: {**r, "identity": "the settings"}, "'identity' is a JSON string, not an object"),
        (lambda r: {k: v for k, v in r.items() if k != "identity"}, "has no 'identity'"),
        (lambda r: {**r, "identity": {}}, "other settings \\(the recorded identity holds none of its"),
        (lambda r: {**r, "models": [r["models"]["seed0"]]}, "'models' is a JSON list, not an object"),
        (lambda r: drop(r, "variant"), "has no 'models.seed0.k4-dense_core.variant'"),
        (lambda r: drop(r, "l0"), "has no 'models.seed0.k4-dense_core.l0'"),
        (lambda r: {**r, "models": {"seed0": {"k4-dense_core": {**model(r), "fvu": "0.1"}}}}, "'models.seed0.k4-de"),
    ],
)
def test_a_damaged_study_results_file_is_refused_naming_what_is_wrong(tiny_lm_dir, tmp_path, damage, problem):
    finished_distillation(tmp_path / "distillation")
    arguments = study_arguments(tmp_path, tiny_lm_dir)
    recorded = {
        "identity": PaperClaims(*arguments).identity(),
        "models": {"seed0": {"k4-dense_core": {"variant": "dense_core", "k": 4, "l0": 10.0, "fvu": 0.1}}},
        "matched": {},
    }
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "results.json").write_text(json.dumps(damage(recorded)))
    with pytest.raises(ValueError, match=rf"results/results.json.*{problem}"):
        PaperClaims(*arguments).run()
    if "identity" not in problem:  # the report reads the file through the same schema
        with pytest.raises(ValueError, match=rf"results/results.json.*{problem}"):
            claims_report(tmp_path / "results")
    assert not (tmp_path / "study").exists()


def model(results: dict) -> dict:
    return results["models"]["seed0"]["k4-dense_core"]


def drop(results: dict, name: str) -> dict:
    return {**results, "models": {"seed0": {"k4-dense_core": {k: v for k, v in model(results).items() if k != name}}}}


def test_bad_study_arguments_are_refused(tmp_path, tiny_lm_dir):
    finished_distillation(tmp_path / "distillation")
    arguments = study_arguments(tmp_path, tiny_lm_dir)
    with pytest.raises(ValueError, match="against 'matryoshka'"):
        PaperClaims(*changed(arguments, variants=["dense_core"]))
    with pytest.raises(ValueError, match="consistency_k=24"):
        PaperClaims(dataclasses.replace(arguments[0], consistency_k=24), *arguments[1:])
    with pytest.raises(ValueError, match="repeats"):
        StudyArguments(matryoshka_ks=[64])
    with pytest.raises(ValueError, match="give distinct seeds"):
        StudyArguments(seeds=[0, 0])
    with pytest.raises(ValueError, match=r"variants=\['dmsae'\] is invalid"):
        StudyArguments(variants=["dmsae"])
    with pytest.raises(ValueError, match="latent_match_cos=1.5 is invalid"):
        StudyArguments(latent_match_cos=1.5)
