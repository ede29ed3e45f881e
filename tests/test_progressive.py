import pytest
import torch
from conftest import tiny_model

from hf_dmsae.evaluation.held_out import activation_metrics
from hf_dmsae.evaluation.progressive import latent_statistics, order_by, prefix_fvu, reorder_latents


def trained_like(seed: int = 0):
    """A tiny DMSAE (core of 8) with its inference threshold calibrated on its own activations, and held-out rows."""
    model = tiny_model(seed)
    torch.manual_seed(seed + 1)
    rows = torch.randn(2048, 16) @ torch.randn(16, 16)
    model.calibrate_threshold(rows[:1024])
    return model, list(rows[1024:].split(256))


def test_the_whole_prefix_is_the_model_and_the_statistics_are_what_they_say():
    model, batches = trained_like()
    assert prefix_fvu(model, batches, [128])[128] == pytest.approx(activation_metrics(model, batches)["fvu"], rel=1e-5)
    stats = latent_statistics(model, batches)
    latents = torch.cat([model.eval().encode(x) for x in batches])
    torch.testing.assert_close(stats["frequency"], (latents > 0).float().mean(0))
    torch.testing.assert_close(stats["mean_squared"], latents.pow(2).mean(0))
    assert torch.equal(order_by(torch.tensor([0.5, 2.0, 0.5, 1.0])), torch.tensor([1, 3, 0, 2]))
    with pytest.raises(ValueError, match="prefix_sizes"):
        prefix_fvu(model, batches, [129])


def test_a_reordered_model_reconstructs_the_same_and_its_prefixes_follow_the_new_order():
    model, batches = trained_like()
    mean_squared = latent_statistics(model, batches)["mean_squared"]
    order = torch.cat([torch.arange(8), 8 + order_by(mean_squared[8:])])  # the core stays first
    reordered = reorder_latents(model, order)
    for x in batches[:2]:
        latents, moved = model.eval().encode(x), reordered.eval().encode(x)
        torch.testing.assert_close(moved, latents[:, order])
        # The decoder sums the same terms in another order: each output moves by a few ulps of its terms' |sum|.
        summed = (latents.abs() @ model.W_dec.abs() + model.b_dec.abs()) * model.config.norm_factor
        error = (reordered.decode(moved) - model.decode(latents)).abs()
        assert (error <= 8 * torch.finfo(torch.float32).eps * summed).all()
    prefixes = [8, 16, 40, 128]
    by_order, natural = prefix_fvu(model, batches, prefixes, order), prefix_fvu(reordered, batches, prefixes)
    assert by_order == pytest.approx(natural, rel=1e-5)
    assert torch.equal(reordered.W_enc_frozen, model.W_enc_frozen)
    with pytest.raises(ValueError, match="moves core latents"):
        reorder_latents(model, torch.arange(128).flip(0))
    with pytest.raises(ValueError, match="not a permutation"):
        reorder_latents(model, torch.zeros(128, dtype=torch.long))
