import pytest
import torch
from conftest import tiny_model

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.data.activations import TrainingPositions
from hf_dmsae.data.embedded import EMBEDDED_LM, wiki_summaries
from hf_dmsae.data.language_model import load_language_model
from hf_dmsae.data.text import TokenPacking, batched
from hf_dmsae.evaluation.consistency import latent_matches, match_share
from hf_dmsae.evaluation.core_usage import core_usage
from hf_dmsae.evaluation.held_out import METRICS_DIR, activation_metrics, ce_loss_recovered, fvu_sums, load_metric


def identity_sae(d: int = 32, hook_layer: int = 2) -> DMSAEModel:
    """Latents ReLU(x) and ReLU(−x) on ±unit decoder rows: every activation is reconstructed exactly."""
    config = DMSAEConfig(
        d_in=d, dict_size=2 * d, k=d, sparsity="sparse_core", hook_layer=hook_layer, hook_name="resid_post"
    )
    sae = DMSAEModel(config)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc_trainable.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


def test_metric_modules_load_with_evaluate_and_compute_their_definitions():
    import evaluate

    for name in ("fvu", "l0", "dead_latents", "ce_loss_recovered"):
        assert "## Metric description" in (METRICS_DIR / name / "README.md").read_text()
        assert evaluate.load(str(METRICS_DIR / name)).name == name
    x, x_hat = torch.randn(50, 8).double() + 3.0, torch.randn(50, 8).double()
    fvu = load_metric("fvu")
    for rows in (slice(0, 20), slice(20, 50)):
        fvu.add(**fvu_sums(x[rows], x_hat[rows]))
    expected = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu.compute()["fvu"] == pytest.approx(float(expected), rel=1e-6)  # float32 temporaries, float64 sums
    assert load_metric("l0").compute(core_active=[0, 3], noncore_active=[5, 2], rows=[1, 1]) == {
        "l0_core": 1.5,
        "l0_noncore": 3.5,
        "l0": 5.0,
    }
    dead = load_metric("dead_latents").compute(fired_latents=[[3], [0, 3], []], dict_size=4)
    assert dead == {"dead_fraction": 0.5}
    ce = load_metric("ce_loss_recovered").compute(
        loss_clean=[4.0], loss_spliced=[6.0], loss_zero_ablated=[12.0], tokens=[2]
    )
    assert ce["ce_loss_recovered"] == pytest.approx((6.0 - 3.0) / (6.0 - 2.0))
    with pytest.raises(ValueError, match="unknown metric 'mse'"):
        load_metric("mse")


def test_activation_metrics_match_their_definitions():
    sae = identity_sae()
    x = torch.randn(200, 32)
    metrics = activation_metrics(sae, x.split(64))
    assert metrics["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["l0"] == pytest.approx(32.0) and metrics["l0_core"] == 0.0
    assert metrics["dead_fraction"] == 0.0

    model = tiny_model()
    model.train()
    for _ in range(10):
        model(torch.randn(64, 16))
    x = torch.randn(300, 16)
    metrics = activation_metrics(model, x.split(100))
    model.eval()
    latents = model.encode(x)
    expected_fvu = (x - model.decode(latents)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert metrics["fvu"] == pytest.approx(float(expected_fvu.detach()), rel=1e-5)
    assert metrics["l0_core"] == pytest.approx(float((latents[:, :8] > 0).sum(1).float().mean()))
    assert metrics["dead_fraction"] == pytest.approx(1 - float((latents > 0).any(0).float().mean()))


def test_ce_loss_recovered_is_one_for_a_perfect_sae_and_zero_for_a_silent_one():
    lm, tokenizer = load_language_model(EMBEDDED_LM)  # the real LM: a random one barely cares what its residual holds
    texts = (row["text"] for row in wiki_summaries()["test"])
    sequences = [ids for ids, _ in TokenPacking(tokenizer, 64).sequences(texts)][:8]
    batches = [torch.tensor(group) for group in batched(sequences, 4)]
    positions = TrainingPositions(tokenizer, 0.0, None)
    perfect = ce_loss_recovered(identity_sae(576, 15), lm, batches, positions)
    assert perfect["ce_loss_clean"] < 4.0 < perfect["ce_loss_zero_ablated"]
    assert perfect["ce_loss_spliced"] == pytest.approx(perfect["ce_loss_clean"], rel=1e-4)
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)

    silent = identity_sae(576, 15)
    with torch.no_grad():
        silent.b_enc.fill_(-1e6)
    assert ce_loss_recovered(silent, lm, batches, positions)["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)


def test_a_latent_matches_only_a_direction_within_the_cosine_and_of_the_same_sign():
    decoder = torch.nn.functional.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    other = torch.cat([decoder[:3] * 2.0, -decoder[3:4], decoder[4:5] + 0.6 * decoder[5:6]])
    cos_of_tilted = float(torch.nn.functional.cosine_similarity(other[4], decoder[4], dim=0))
    assert match_share(decoder, other, 0.9, rows=[0, 1, 2]) == 1.0  # same directions, any scale
    assert match_share(decoder, other, 0.9, rows=[3]) == 0.0  # the flipped direction is another feature
    assert match_share(decoder, other, cos_of_tilted - 1e-4, rows=[4]) == 1.0
    assert match_share(decoder, other, cos_of_tilted + 1e-4, rows=[4]) == 0.0
    assert cos_of_tilted < 0.9 and match_share(decoder, other, 0.9) == 3 / 6  # rows 0-2 only
    assert match_share(decoder, other, 0.9, rows=[]) is None


def test_latent_matches_compare_each_model_with_the_right_others():
    # A model's decoder depends on its seed alone here: the same seed's models at any k match wholly, other seeds'
    # (random directions in 16 dimensions) almost never, and a model rebuilt as its own init matches itself.
    def model(seed, k, variant):
        return tiny_model(seed=seed, core_size=4 if variant == "dense_core" else 0)

    matches = latent_matches(model, lambda m, seed: m, [0, 1, 2], [8, 16, 32], 16, ["dense_core", "matryoshka"], 0.9)
    assert matches["from_k"] == 8 and matches["at_k"] == 16 and matches["seeds"] == [0, 1, 2]
    dense = matches["variants"]["dense_core"]
    assert set(dense["same_seed"]) == set(dense["other_seeds"]) == {"k16", "k32"}
    assert dense["same_seed"]["k32"] == {"core": [1.0] * 3, "noncore": [1.0] * 3}
    assert dense["initial"] == {"core": [1.0] * 3, "noncore": [1.0] * 3}
    assert len(dense["other_seeds"]["k16"]["noncore"]) == 6 and max(dense["other_seeds"]["k16"]["noncore"]) < 0.1
    assert len(dense["across_seeds"]["core"]) == 6 and max(dense["across_seeds"]["noncore"]) < 0.1
    assert matches["variants"]["matryoshka"]["same_seed"]["k16"]["core"] == [None] * 3  # no core to count


def test_core_usage_counts_the_core_each_way_fig3_could_and_measures_what_it_reconstructs():
    model = tiny_model()  # a dense core of 8 random rows
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(1)) * 3
    assert core_usage(model, x)["l0_core_above_threshold"] is None  # no inference threshold estimated yet
    model.threshold.fill_(0.5)
    model.train()
    usage = core_usage(model, x)
    assert model.training  # measured in inference mode, left as it was
    latents = model.eval().encode(x)
    positive, above = ((latents[:, :8] > t).sum(1).float().mean().item() for t in (0.0, 0.5))
    assert usage["l0_core_positive"] == pytest.approx(positive, abs=1e-5)
    assert usage["l0_core_above_threshold"] == pytest.approx(above, abs=1e-5)
    assert 0 < usage["l0_core_above_threshold"] < usage["l0_core_positive"]
    assert 0 < usage["core_energy_share"] < 1 and usage["fvu_without_core"] != usage["fvu"]
    model.W_dec.data[:8] = 0  # a core that decodes to nothing carries none of the reconstruction
    silent = core_usage(model, x)
    assert silent["core_energy_share"] == 0 and silent["fvu_without_core"] == silent["fvu"]
    assert core_usage(tiny_model(core_size=0), x) == {}
