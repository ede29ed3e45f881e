import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_activation_args
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.activations import LayerActivations, TrainingPositions, load_language_model
from hf_dmsae.attribution import (
    AttributionArguments,
    StreamingQuantile,
    gxa_scores,
    select_by_coverage,
    select_core,
)
from hf_dmsae.core import DMSAECore


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return load_language_model(tiny_activation_args(tiny_lm_dir))


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    config = DMSAEConfig(
        d_in=32, dict_size=96, core_size=6, k=6, core_ids=[f"cycle0:{i}" for i in range(6)],
        hook_layer=2, hook_name="resid_post", norm_factor=2.0, cycle=1,
    )  # fmt: skip
    model = DMSAEModel.from_core(config, torch.randn(6, 32), config.core_ids)
    with torch.no_grad():
        model.b_enc.fill_(-0.05)
    return model.eval()


@pytest.mark.parametrize("q", [0.99, 0.9, 0.5, 0.0, 1.0])
def test_streaming_quantile_is_exact(q):
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(1003, 7, generator=generator) * (torch.rand(1003, 7, generator=generator) < 0.1)
    quantile = StreamingQuantile(7, q, max_rows=1200)
    for chunk in values.split(100):
        quantile.update(chunk)
    assert quantile.top.shape[1] <= quantile.keep < 1200 or q == 0.0
    torch.testing.assert_close(quantile.compute(), torch.quantile(values, q, dim=0), rtol=0, atol=1e-7)


def test_streaming_quantiles_merge_across_processes():
    values = torch.rand(500, 3)
    first, second = StreamingQuantile(3, 0.95, 500), StreamingQuantile(3, 0.95, 500)
    first.update(values[:230])
    second.update(values[230:])
    first.merge(second.top, second.count)
    torch.testing.assert_close(first.compute(), torch.quantile(values, 0.95, dim=0), rtol=0, atol=1e-7)


def autograd_reference(lm, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stream after block `layer` and the gradient of the summed next-token loss there, by plain autograd
    through the whole model (embeddings requiring grad, `retain_grad` on the hidden state)."""
    embeds = lm.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    out = lm(inputs_embeds=embeds, output_hidden_states=True)
    hidden = out.hidden_states[layer + 1]
    hidden.retain_grad()
    vocab = out.logits.shape[-1]
    F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].flatten(), reduction="sum").backward()
    return hidden.detach(), hidden.grad


def test_activation_gradients_equal_autograd(tiny_lm):
    lm, _ = tiny_lm
    input_ids = torch.randint(3, lm.config.vocab_size, (2, 24))
    acts, grads = LayerActivations(lm, 2, "resid_post").with_gradient(input_ids)
    expected_acts, expected_grads = autograd_reference(lm, input_ids, 2)
    torch.testing.assert_close(acts, expected_acts)
    torch.testing.assert_close(grads, expected_grads)
    assert grads.abs().sum() > 0


def test_gxa_scores_equal_a_brute_force_quantile(tiny_lm, sae):
    lm, tokenizer = tiny_lm
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, lm.config.vocab_size, (4, 16), generator=generator) for _ in range(5)]
    for batch in batches:
        batch[:, 0] = tokenizer.bos_token_id
    positions = TrainingPositions(tokenizer, outlier_norm_ratio=0)
    scores = gxa_scores(sae, lm, batches, positions=positions, max_tokens=280, q=0.9)

    pool = sae.config.candidate_pool_size
    unit = sae.W_dec[:pool] / sae.W_dec[:pool].norm(dim=1, keepdim=True)
    rows = []
    for batch in batches:
        hidden, gradient = autograd_reference(lm, batch, 2)
        keep = batch != tokenizer.bos_token_id
        x, g = hidden[keep], gradient[keep]
        z = torch.relu((x / 2.0 - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
        tail = z[:, 6:]
        kth = tail.flatten().sort(descending=True).values[sae.config.k_noncore * len(x) - 1]
        a = torch.cat([z[:, :6], tail * (tail >= kth)], dim=1)[:, :pool]
        rows.append((a * (g @ unit.T)).abs())
    matrix = torch.cat(rows)[:280]
    assert matrix.shape == (280, pool)
    expected = torch.quantile(matrix, 0.9, dim=0)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    assert (scores[:6] > 0).all(), "dense core latents are always scored"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=1e3, allow_nan=False, width=32), min_size=1, max_size=60),
    st.floats(min_value=0.01, max_value=1.0),
)
def test_select_by_coverage_reaches_tau_with_the_fewest_latents(values, tau):
    scores = torch.tensor(values, dtype=torch.float32)
    selection = select_by_coverage(scores, tau)
    total = scores.double().sum()
    chosen = scores[selection.indices].double()
    if total == 0:
        assert len(selection.indices) == 0
        return
    assert chosen.sum() >= tau * total * (1 - 1e-9)
    # No smaller set can reach tau: the best set of one fewer latents is the top |C|-1 scores.
    best_smaller = scores.double().sort(descending=True).values[: len(chosen) - 1].sum()
    assert best_smaller < tau * total
    assert torch.equal(scores[selection.order], scores.sort(descending=True, stable=True).values)
    assert selection.coverage_curve[len(chosen) - 1] >= tau * (1 - 1e-9)


def test_selected_core_carries_the_rows_and_ids_of_its_latents(tiny_lm, tiny_lm_dir, sae, tmp_path):
    lm, tokenizer = tiny_lm
    args = AttributionArguments(attribution_tokens=300, attribution_batch_size=4, q=0.9, tau=0.8)
    core = select_core(sae, lm, tokenizer, tiny_activation_args(tiny_lm_dir), args, cycle=1)
    ids = sae.config.latent_ids()
    assert 0 < len(core) < sae.config.candidate_pool_size and core.coverage >= 0.8
    for row, latent in zip(core.encoder_rows, core.latent_ids):
        assert torch.equal(row, sae.W_enc[ids.index(latent)])
    assert core.provenance["cycle"] == 1 and core.provenance["tau"] == 0.8
    core.save_pretrained(tmp_path / "core")
    reloaded = DMSAECore.from_pretrained(tmp_path / "core")
    assert reloaded.latent_ids == core.latent_ids and torch.equal(reloaded.encoder_rows, core.encoder_rows)
    torch.testing.assert_close(reloaded.coverage_curve, core.coverage_curve)
