import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_activation_args, tiny_run_data
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.data.language_model import LayerActivations, load_language_model
from hf_dmsae.method.attribution import (
    Attribution,
    AttributionArguments,
    StreamingQuantile,
    core_from_scores,
    gxa_scores,
    select_by_coverage,
    training_sized_batches,
)
from hf_dmsae.method.scorers import ablation_values, gxa_values, integrated_gradient_values, pool_latents
from hf_dmsae.model.core import DMSAECore


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return load_language_model(str(tiny_lm_dir))


def sae_with_core(norm_factor: float) -> DMSAEModel:
    """A random cycle-1 DMSAE with a core of 6 latents, hooked at block 2 of the tiny LM."""
    torch.manual_seed(0)
    config = DMSAEConfig(
        d_in=32,
        dict_size=96,
        core_size=6,
        k=6,
        core_ids=[f"cycle0:{i}" for i in range(6)],
        hook_layer=2,
        hook_name="resid_post",
        norm_factor=norm_factor,
        cycle=1,
    )
    return DMSAEModel.from_core(config, torch.randn(6, 32)).eval()


@pytest.fixture(scope="module")
def sae():
    model = sae_with_core(norm_factor=2.0)
    with torch.no_grad():
        model.b_enc.fill_(-0.05)
    return model


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


def naive_pool_latents(sae: DMSAEModel, x: torch.Tensor) -> torch.Tensor:
    """Training masks over the rows of `x` by sorting: the core unmasked, BatchTopK on the rest; pool columns."""
    config = sae.config
    z = torch.relu((x / config.norm_factor - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    tail = z[:, config.core_size :]
    kth = tail.flatten().sort(descending=True).values[config.k_noncore * len(x) - 1]
    return torch.cat([z[:, : config.core_size], tail * (tail >= kth)], dim=1)[:, : config.candidate_pool_size]


def test_pool_latents_are_the_training_masks_restricted_to_the_pool(sae):
    x = torch.randn(64, 32) * 3
    latents = pool_latents(sae, x, sae.config.candidate_pool_size)
    expected = naive_pool_latents(sae, x)
    assert torch.equal(latents > 0, expected > 0)
    torch.testing.assert_close(latents, expected)
    torch.testing.assert_close(latents, sae.encode(x, batch_topk=True)[:, : sae.config.candidate_pool_size])


def test_training_sized_batches_fill_the_last_batch_with_the_first_pairs():
    pairs = torch.arange(23.0)[:, None].repeat(1, 2)
    blocks = [{"activations": pairs[i : i + 7], "gradients": -pairs[i : i + 7]} for i in range(0, 23, 7)]
    batches = list(training_sized_batches(blocks, 10))
    assert [new for _, _, new in batches] == [10, 10, 3]
    assert torch.equal(torch.cat([a for a, _, _ in batches])[:, 0], torch.cat([torch.arange(23.0), torch.arange(7.0)]))
    assert all(torch.equal(g, -a) for a, g, _ in batches)
    short = list(training_sized_batches([{"activations": pairs[:4], "gradients": pairs[:4]}], 10))
    assert len(short) == 1 and short[0][2] == 4 and torch.equal(short[0][0][:, 0], torch.arange(10.0) % 4)


def test_gxa_scores_equal_a_brute_force_quantile(sae):
    generator = torch.Generator().manual_seed(1)
    acts, grads = torch.randn(500, 32, generator=generator) * 3, torch.randn(500, 32, generator=generator)
    blocks = [{"activations": acts[i : i + 130], "gradients": grads[i : i + 130]} for i in range(0, 500, 130)]
    scores = gxa_scores(sae, blocks, batch_size=64, q=0.9, max_rows=600)

    pool = sae.config.candidate_pool_size
    unit = sae.W_dec[:pool] / sae.W_dec[:pool].norm(dim=1, keepdim=True)
    wrapped_acts, wrapped_grads = torch.cat([acts, acts[:12]]), torch.cat([grads, grads[:12]])
    values = torch.cat(
        [
            (naive_pool_latents(sae, a) * (g @ unit.T)).abs()
            for a, g in zip(wrapped_acts.split(64), wrapped_grads.split(64), strict=True)
        ]
    )[:500]
    torch.testing.assert_close(scores, torch.quantile(values, 0.9, dim=0), rtol=1e-4, atol=1e-6)
    assert (scores[:6] > 0).all(), "dense core latents are always scored"
    means = gxa_scores(sae, blocks, batch_size=64, q=0.9, max_rows=600, aggregation="mean")
    torch.testing.assert_close(means, values.mean(0), rtol=1e-4, atol=1e-7)


def attribution_scores(data, sae, batch_size=64, **overrides):
    args = AttributionArguments(attribution_tokens=1500, q=0.9, tau=0.8, **overrides)
    attribution = Attribution(data, args, batch_size)
    return attribution, attribution.scores(sae)


def test_scores_from_cached_pairs_equal_the_live_lm(tiny_lm_dir, tmp_path, sae):
    data = tiny_run_data(tmp_path / "run", tiny_activation_args(tiny_lm_dir))
    cached, from_cache = attribution_scores(data, sae, cache_attribution_pairs=True)
    live, from_lm = attribution_scores(data, sae, cache_attribution_pairs=False)
    cached, live = cached.gradients, live.gradients
    assert cached.slice == live.slice and len(cached._cache) > 1000
    assert torch.equal(from_cache, from_lm)  # the same fp32 pairs in the same order: the same scores
    assert (tmp_path / "run" / "cache").is_dir() and cached._cache.extra["end"] == cached.slice.end.to_dict()


def test_scores_do_not_depend_on_the_lm_batching(tiny_lm_dir, tmp_path, sae):
    scores = []
    for lm_batch, attribution_batch in ((16, 8), (5, 3)):
        args = tiny_activation_args(tiny_lm_dir, lm_batch_size=lm_batch)
        data = tiny_run_data(tmp_path / f"run{lm_batch}", args)
        attribution, result = attribution_scores(data, sae, attribution_batch_size=attribution_batch)
        scores.append((attribution.gradients.slice, data.harvester.statistics, result))
    (slice_a, stats_a, a), (slice_b, stats_b, b) = scores
    assert slice_a == slice_b and stats_a.median_norm == pytest.approx(stats_b.median_norm, rel=1e-5)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


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


def test_selected_core_carries_the_rows_and_ids_of_its_latents(sae, tmp_path):
    scores = torch.linspace(2.0, 0.0, sae.config.candidate_pool_size)
    core = core_from_scores(sae, scores, 0.8, cycle=1, q=0.9, tokens=100)
    ids = sae.config.latent_ids()
    assert 0 < len(core) < sae.config.candidate_pool_size and core.coverage >= 0.8
    for row, latent in zip(core.encoder_rows, core.latent_ids, strict=True):
        assert torch.equal(row, sae.W_enc[ids.index(latent)])
    assert core.provenance["cycle"] == 1 and core.provenance["tau"] == 0.8
    core.save_pretrained(tmp_path / "core")
    reloaded = DMSAECore.from_pretrained(tmp_path / "core")
    assert reloaded.latent_ids == core.latent_ids and torch.equal(reloaded.encoder_rows, core.encoder_rows)
    torch.testing.assert_close(reloaded.coverage_curve, core.coverage_curve)
    assert reloaded.digest() == core.digest()


def test_a_pool_that_scores_nothing_is_an_error_not_an_empty_core(sae):
    with pytest.raises(ValueError, match="every candidate latent scored 0 .*q=0.5"):
        core_from_scores(sae, torch.zeros(sae.config.candidate_pool_size), 0.9, q=0.5, tokens=100)


def test_attribution_arguments_are_checked_when_parsed():
    for bad, message in (
        (dict(q=1.0), "q=1.0"),
        (dict(tau=0.0), "tau=0.0"),
        (dict(tau=1.5), "tau=1.5"),
        (dict(stop_at_selection_overlap=0.9), "needs track_selection_steps"),
    ):
        with pytest.raises(ValueError, match=message):
            AttributionArguments(**bad)


def test_ablation_and_integrated_gradients_on_the_lm_against_their_definitions(tiny_lm_dir, tmp_path):
    """On the tiny LM's own next-token loss: each ablation value is the change of a position's loss from a forward
    with that latent's decoded part removed at every scored position, computed here by hand; integrated gradients
    with one step is GxA at the clean activations (the same masks and gradient), and with more steps moves away from
    it while ranking latents alike."""
    data = tiny_run_data(tmp_path / "run", tiny_activation_args(tiny_lm_dir))
    sae = sae_with_core(data.sae_fields()["norm_factor"])  # its latents fire on the LM's rows
    args = AttributionArguments(attribution_tokens=1500, scorer_tokens=200, q=0.9)
    objective = data.objective(args, batch_size=64)
    batch = objective.batches()[0]
    assert batch.activations.shape[:2] == batch.keep.shape == batch.context.shape == (2, 32)  # 64 // 32 sequences
    assert objective.max_rows == sum(int(b.keep.sum()) for b in objective.batches()) >= 150
    pool = sae.config.candidate_pool_size
    values = ablation_values(sae, objective, batch, pool)
    x, keep = batch.activations, batch.keep
    latents = pool_latents(sae, x[keep], pool)
    layer = LayerActivations(data.lm, 2)
    clean = layer.patched_loss(batch.context, lambda h: h, per_position=True)
    activity = latents.ne(0).sum(0)
    for j in (int(activity[:6].argmax()), int(activity[6:].argmax()) + 6):  # the most active core and other latent
        ablated = x.clone()
        ablated[keep] -= latents[:, j, None] * sae.W_dec[j] * sae.config.norm_factor
        expected = (layer.patched_loss(batch.context, lambda h, a=ablated: a, per_position=True) - clean)[keep].abs()
        assert expected.max() > 0
        torch.testing.assert_close(values[:, j], expected, rtol=1e-4, atol=1e-6)

    _, gradients = layer.with_gradient(batch.context)
    gxa = gxa_values(sae, x[keep], gradients[keep], pool)
    torch.testing.assert_close(integrated_gradient_values(sae, objective, batch, pool, steps=1), gxa)
    integrated = integrated_gradient_values(sae, objective, batch, pool, steps=4)
    assert not torch.allclose(integrated, gxa, rtol=1e-3, atol=1e-6)
    mean_ig, mean_gxa = integrated.mean(0), gxa.mean(0)
    ranks = torch.stack([mean_ig.argsort().argsort(), mean_gxa.argsort().argsort()]).float()
    assert torch.corrcoef(ranks)[0, 1] > 0.5


def test_every_scorer_selects_a_core_and_says_which(tiny_lm_dir, tmp_path):
    data = tiny_run_data(tmp_path / "run", tiny_activation_args(tiny_lm_dir))
    sae = sae_with_core(data.sae_fields()["norm_factor"])  # its latents fire on the LM's rows
    for scorer, aggregation in (("gxa", "mean"), ("ablation", "quantile"), ("integrated_gradients", "mean")):
        settings = dict(scorer=scorer, aggregation=aggregation, ig_steps=2)
        args = AttributionArguments(attribution_tokens=1500, scorer_tokens=100, q=0.9, tau=0.8, **settings)
        attribution = Attribution(data, args, 64)
        core = attribution.select(sae, cycle=1)
        assert 0 < len(core) < sae.config.candidate_pool_size
        assert core.provenance["scorer"] == scorer and core.provenance["aggregation"] == aggregation
        assert core.provenance["tokens"] == attribution.max_rows
        assert (attribution.max_rows > 1000) == (scorer == "gxa")  # gxa scores the whole split
