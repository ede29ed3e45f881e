import json

import pytest
import torch
import torch.nn.functional as F

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.evaluation.consistency import consistency
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.scorers import ablation_values, gxa_values, integrated_gradient_values, pool_latents
from hf_dmsae.model.core import DMSAECore
from hf_dmsae.reporting.synthetic import synthetic_report
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.launch import parse_arguments
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.run.training import load_trained_model
from hf_dmsae.studies import synthetic_world
from hf_dmsae.studies.arguments import StudyArguments
from hf_dmsae.studies.consensus import consensus_members
from hf_dmsae.studies.synthetic import SyntheticBenchmark
from hf_dmsae.studies.synthetic_world import (
    SyntheticArguments,
    SyntheticSource,
    SyntheticWorld,
    match_truth,
    r_precision,
)

TYPES = (StudyArguments, SyntheticArguments, SAEArguments, AttributionArguments, DMSAETrainingArguments)
TINY_WORLD = dict(num_features=64, hidden_dim=32, root_features=2, correlation_rank=4, readout_classes=5)


def test_consistency_is_one_for_the_same_directions_in_any_order_and_sign():
    decoder = torch.randn(20, 8)
    assert consistency(decoder, -decoder[torch.randperm(20)] * 3) == pytest.approx(1.0)
    assert consistency(torch.eye(4), torch.eye(4)[:, [1, 0, 3, 2]] + torch.eye(4)) < 1.0


def test_matching_a_core_against_the_truth():
    truth = torch.eye(6)
    core = torch.stack([2 * truth[0], -truth[3], truth[1] + truth[2]])  # two exact matches (any scale or sign), one not
    scores = match_truth(core, truth, match_cos=0.9)
    assert scores["size"] == 3
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 6)
    useful = torch.tensor([False, True, True, False])
    assert r_precision([2, 0, 1, 3], useful) == 0.5 and r_precision([1, 2, 0, 3], useful) == 1.0
    assert r_precision([0, 3], useful) is None


def test_the_task_gradient_is_the_gradient_of_the_task_loss():
    world = SyntheticWorld(SyntheticArguments(**TINY_WORLD))
    x, f = world.sample(50, seed=3)
    labels = world.labels(f, seed=4)
    assert torch.equal(x, world.sample(50, seed=3)[0]) and not torch.equal(x, world.sample(50, seed=5)[0])
    x.requires_grad_(True)
    F.cross_entropy(world.logits(x), labels, reduction="sum").backward()
    torch.testing.assert_close(world.gradients(x.detach(), labels), x.grad, rtol=1e-4, atol=1e-5)
    # The useful features carry the readout: their columns are ~10x the others'.
    weights = world.readout.abs().mean(0)
    useful = torch.zeros(64, dtype=torch.bool)
    useful[world.useful] = True
    assert useful.sum() == 16 and weights[useful].mean() > 5 * weights[~useful].mean()


def test_the_task_objective_scores_the_attribution_rows_of_the_gradient_pairs():
    """Ablation and integrated gradients read the same rows, labels and loss as GxA's pairs: IG with one step is GxA,
    and an ablation value is the row's task loss change with the latent's decoded part removed."""
    world = SyntheticWorld(SyntheticArguments(**TINY_WORLD))
    source = SyntheticSource(world, 1000, 0, seed=3)
    args = AttributionArguments(attribution_tokens=300, scorer_tokens=200)
    pairs = source.gradient_pairs(args).pairs()[0]
    objective = source.objective(args, batch_size=64)
    assert objective.max_rows == 200 and [len(b.context) for b in objective.batches()] == [64, 64, 64, 8]
    torch.manual_seed(0)
    config = dict(d_in=32, dict_size=48, k=4, group_fractions=[0.5], norm_factor=world.norm_factor)
    sae = DMSAEModel(DMSAEConfig(**config)).eval()
    pool = sae.config.candidate_pool_size
    batch = objective.batches()[1]
    x, g = pairs["activations"][64:128], pairs["gradients"][64:128]
    assert torch.equal(batch.activations[:, 0], x)
    torch.testing.assert_close(integrated_gradient_values(sae, objective, batch, pool, 1), gxa_values(sae, x, g, pool))
    values = ablation_values(sae, objective, batch, pool)
    latents = pool_latents(sae, x, pool)
    j = int(latents.ne(0).sum(0).argmax())
    ablated = x - latents[:, j, None] * sae.W_dec[j] * world.norm_factor
    change = F.cross_entropy(world.logits(ablated), batch.context, reduction="none") - F.cross_entropy(
        world.logits(x), batch.context, reduction="none"
    )
    assert change.abs().max() > 0
    torch.testing.assert_close(values[:, j], change.abs(), rtol=1e-4, atol=1e-6)


def test_a_consensus_keeps_the_reference_latents_a_majority_of_seeds_selected():
    reference = torch.eye(4)
    others = [torch.eye(4)[[0, 1]], torch.eye(4)[[0, 2]] * 3, -torch.eye(4)[[3]]]  # scale is not direction; sign is
    assert consensus_members([reference, *others], match_cos=0.9, min_seeds=3) == [0]
    assert consensus_members([reference, *others], match_cos=0.9, min_seeds=2) == [0, 1, 2]
    assert consensus_members([reference, torch.empty(0, 4)], match_cos=0.9, min_seeds=1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="min_seeds"):
        consensus_members([reference], match_cos=0.9, min_seeds=2)


def test_a_large_training_slice_is_drawn_in_chunks_the_first_of_which_is_the_one_draw(monkeypatch):
    world = SyntheticWorld(SyntheticArguments(**TINY_WORLD))
    monkeypatch.setattr(synthetic_world, "SAMPLE_CHUNK", 1000)
    one_chunk = SyntheticSource(world, 1000, 0, seed=3)
    rows = one_chunk.training_data(one_chunk.training_slice("s"), None).rows
    assert torch.equal(rows, world.sample(1000, synthetic_world._seed_of(3, "s"))[0])
    large = SyntheticSource(world, 2500, 0, seed=3)
    chunked = large.training_data(large.training_slice("s"), None).rows
    assert chunked.shape == (2500, 32) and torch.equal(chunked[:1000], rows)
    assert not torch.equal(chunked[1000:2000], rows), "each chunk draws rows of its own"


def test_the_benchmark_runs_the_shipped_distillation_and_transfer_and_scores_them(tmp_path):
    config = tmp_path / "synthetic.json"
    config.write_text(
        json.dumps(
            {
                **TINY_WORLD,
                "seeds": [0, 1],
                "num_cycles": 1,
                "transfer_ks": [2, 4],  # the flag's name before it became StudyArguments.ks, still taken
                "train_rows": 8192,
                "eval_rows": 4096,
                "dict_size": 64,
                "k": 4,
                "group_fractions": [0.25, 0.25, 0.25],
                "dead_tokens_threshold": 4096,
                "attribution_tokens": 4096,
                "q": 0.95,
                "output_dir": str(tmp_path / "run"),
                "per_device_train_batch_size": 512,
                "learning_rate": 0.003,
                "save_steps": 8,
                "report_to": "none",
            }
        )
    )
    arguments = parse_arguments(TYPES, [str(config)])
    results = SyntheticBenchmark(*arguments).run()

    run = tmp_path / "run"
    for seed in (0, 1):
        # The runs are the shipped ones: their state is what Distillation and Transfer write.
        distillation = json.loads((run / f"seed{seed}" / "distillation" / "state.json").read_text())
        transfer = json.loads((run / f"seed{seed}" / "transfer" / "state.json").read_text())
        assert distillation["kind"] == "distillation" and transfer["kind"] == "transfer"
        assert distillation["identity"]["inputs.synthetic_seed"] == seed
        assert set(transfer["results"]) == {
            f"k{k}-{v}" for k in (2, 4) for v in ("dense_core", "sparse_core", "matryoshka")
        }
        distilled = DMSAECore.from_pretrained(run / f"seed{seed}" / "distillation" / "distilled-core")
        assert (
            distilled.latent_ids
            == load_trained_model(run / f"seed{seed}" / "transfer" / "k4-dense_core").config.core_ids
        )
        scores = results[f"seed{seed}"]
        assert scores["cycles"]["1"]["carried_over"] <= min(
            scores["cycles"]["0"]["size"], scores["cycles"]["1"]["size"]
        )
        cores = {(r["core"], r["selection"]): r for r in scores["selection"]}
        assert {c for c, _ in cores} == {"cycle 0", "cycle 1", "distilled"}
        for core in ("cycle 0", "cycle 1", "distilled"):
            size = cores[core, "attribution"]["size"]
            assert {cores[core, s]["size"] for s in ("random", "frequency", "mean_squared")} == {size}
            assert all(
                0 <= cores[core, s][m] <= 1 for s in ("attribution", "random") for m in ("precision", "recall", "mcc")
            )
            assert (
                cores[core, "attribution"]["r_precision"] is None or 0 <= cores[core, "attribution"]["r_precision"] <= 1
            )
        assert cores["distilled", "attribution"]["size"] == distillation["distilled"]["size"] == len(distilled)
        for result in scores["transfer"].values():
            assert 0 < result["mcc"] <= 1 and result["task_loss_clean"] < result["task_loss_ablated"]
        progressive = scores["progressive"]
        assert progressive["k"] == 4 and progressive["prefixes"][-1] == 64
        assert len(progressive["fvu"]) == 4 and all(
            len(v) == len(progressive["prefixes"]) for v in progressive["fvu"].values()
        )
    assert all(len(pairs) == 1 for pairs in results["consistency"].values())
    matches = results["latent_matches"]  # transfer_ks [2, 4]: k 2 in k 4, and seeds compared at k 4 (both ways)
    assert matches["from_k"] == 2 and matches["at_k"] == 4 and matches["seeds"] == [0, 1]
    rows = matches["variants"]
    assert rows["matryoshka"]["same_seed"]["k4"]["core"] == [None, None]  # no core
    dense = rows["dense_core"]
    assert len(dense["initial"]["core"]) == 2 and all(0 <= x <= 1 for x in dense["initial"]["noncore"])
    assert all(0 <= x <= 1 for column in ("same_seed", "other_seeds") for x in dense[column]["k4"]["noncore"])
    assert all(len(rows[v]["across_seeds"]["noncore"]) == 2 for v in ("dense_core", "sparse_core", "matryoshka"))
    consensus = results["consensus"]["consensus of 2"]  # each seed the reference once, the other seed voting
    cycle0 = [results[f"seed{s}"]["cycles"]["0"]["size"] for s in (0, 1)]
    assert list(results["consensus"]) == ["consensus of 2"] and len(consensus) == 2
    assert all(c["size"] <= size for c, size in zip(consensus, cycle0, strict=True))
    matched = results["matched"]  # every variant against its seed's Matryoshka curve at its measured L0
    assert set(matched) == {"dense_core", "sparse_core"} and set(matched["sparse_core"]) == {"k2", "k4"}
    assert all(len(row["l0"]) == 2 for rows in matched.values() for row in rows.values())
    weights = run / "seed0" / "transfer" / "k4-dense_core" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    rerun = SyntheticBenchmark(*arguments)
    assert rerun.run()["seed0"] == results["seed0"] and weights.stat().st_mtime_ns == before  # nothing retrained
    report = synthetic_report(run)
    assert "| distilled |" in report and "| mean_squared |" in report and "± " in report and "| 1 | " in report
    assert "| 4 | sparse_core |" in report and "Paired differences" in report and "G=64" in report
    assert "## Claim 2: the same latents across sparsities and seeds" in report and "k2→4 other seed" in report
    assert "| consensus of 2 cycle-0 seeds | 2 | 2 |" in report and "| distilled | 2 | 2 |" in report
    assert "## Each variant − the Matryoshka SAE at the same measured L0" in report
    for figure in ("selection_vs_truth", "synthetic_vs_k", "progressive_coding"):
        assert (run / "figures" / f"{figure}.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="other settings"):
        SyntheticBenchmark(*parse_arguments(TYPES, [str(config), "--useful_fraction", "0.5"])).run()


def test_bad_synthetic_arguments_are_refused():
    with pytest.raises(ValueError, match="num_cycles=0 is invalid"):  # the distillation's own rule
        SyntheticArguments(num_cycles=0)
    with pytest.raises(ValueError, match="useful_fraction"):
        SyntheticArguments(useful_fraction=1.0)
