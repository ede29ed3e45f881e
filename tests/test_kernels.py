"""The sparse kernels against the plain reference they replace."""

import copy
import math

import pytest
import torch
from conftest import tiny_config, tiny_model

from hf_dmsae import DMSAEModel
from hf_dmsae.model import kernels
from hf_dmsae.model.kernels import batch_topk_entries
from hf_dmsae.model.sparsity import batch_topk

CPU = torch.device("cpu")


def dense(rows, cols, values, shape):
    return torch.zeros(shape, device=values.device).index_put((rows, cols), values)


@pytest.fixture(params=["sampled bound", "one topk"])
def selection(request, monkeypatch, device):
    """Either selection of `batch_topk_entries`, on the tests' device: the CPU's search above a sampled bound, or
    the one topk CUDA runs."""
    monkeypatch.setattr(kernels, "ONE_TOPK_DEVICES", {device.type} if request.param == "one topk" else set())
    return request.param


@pytest.fixture(params=["one block per group", "blocks of 7 rows", "one call"])
def decode_blocks(request, monkeypatch, device):
    """The decoder's sums as a CPU makes them, in one block per Matryoshka group (the tests' 16-d rows) or in blocks
    of 7 rows, which split every group unevenly (as the bench's 455-row blocks split its 4096 rows), or in the one
    call GPUs make; on the tests' device."""
    if request.param == "blocks of 7 rows":
        monkeypatch.setattr(kernels, "DECODE_BLOCK_BYTES", 7 * 16 * 4)
    monkeypatch.setattr(kernels, "BLOCKED_DECODE_DEVICES", set() if request.param == "one call" else {device.type})
    return request.param


def in_row_column_order(rows, cols, width):
    flat = rows * width + cols
    return bool((flat[1:] > flat[:-1]).all())


@pytest.mark.parametrize("k_total", [1, 37, 256, 1000])
def test_batch_topk_entries_select_what_the_flat_sort_selects(k_total, selection, device):
    z = torch.relu(torch.randn(64, 200)).to(device)
    rows, cols, values = batch_topk_entries(z, k_total)
    assert torch.equal(dense(rows, cols, values, z.shape), batch_topk(z, k_total))
    assert in_row_column_order(rows, cols, z.shape[1]), "∂x's bags rely on the row order"


@pytest.mark.parametrize("inflated", ["sampled values", "unsampled values"])
def test_batch_topk_entries_stay_exact_where_the_sample_misleads(inflated, device, monkeypatch):
    monkeypatch.setattr(kernels, "ONE_TOPK_DEVICES", set())  # the sampled bound on every device
    torch.manual_seed(0)
    z = torch.rand(32, 100).to(device)
    sampled = kernels.sample_positions(z.shape, 400).to(device)
    # Inflated, the ~355 sampled values hold every large one: the bound read from them admits ~25 entries, then
    # ~100, fewer than 150, and is lowered twice (to every entry). Uninflated, values outside the sample hold the 150
    # largest.
    flat = z.view(-1)
    if inflated == "sampled values":
        flat[sampled] += 10.0
    else:
        unsampled = torch.ones(z.numel(), dtype=torch.bool, device=device).index_fill_(0, sampled, False)
        unsampled = unsampled.nonzero().squeeze(1)
        flat[unsampled[torch.randperm(len(unsampled), device=device)[:150]]] += 10.0
    rows, cols, values = batch_topk_entries(z, 150, sample_size=400)
    assert torch.equal(dense(rows, cols, values, z.shape), batch_topk(z, 150))
    assert in_row_column_order(rows, cols, z.shape[1])


def test_the_sample_spreads_over_every_column_even_where_the_step_shares_a_factor_with_the_width():
    positions = kernels.sample_positions((64, 100), 800)  # a step of 8 would visit 25 columns only
    assert len(positions) >= 700
    assert len(torch.unique(positions % 100)) == 100 and len(torch.unique(positions // 100)) == 64


def test_batch_topk_entries_fill_ties_to_exactly_k(selection, device):
    z = torch.zeros(16, 50, device=device)
    z[:, :3] = 1.0  # 48 positive entries, 52 more wanted: they are zeros
    rows, cols, values = batch_topk_entries(z, 100)
    assert len(values) == 100 and int((values > 0).sum()) == 48


@pytest.mark.parametrize(
    "high, low",
    [(0.8, 0.6), (0.5, 0.3), (0.95, 0.85), (0.7, 0.7), (math.inf, -math.inf)],
    ids=["bracket-holds", "all-above-high", "too-few-reach-low", "bracket-on-a-tie", "no-bracket"],
)
def test_the_kth_largest_candidate_is_exact_whether_the_bracket_holds_or_not(high, low):
    torch.manual_seed(0)
    values = torch.rand(1000).mul_(20).round_().div_(20)  # many repeats, some at the bracket's ends
    for k in (1, 150, 300, 1000):
        expected = values.kthvalue(len(values) - k + 1).values
        assert kernels._kth_largest(values, k, high, low) == expected, k


def paired_models(device: torch.device = CPU, **overrides):
    if "frozen_rows" in overrides:  # from_core freezes whole cores; build a partly frozen one directly
        torch.manual_seed(0)
        sparse = DMSAEModel(tiny_config(**overrides))
        with torch.no_grad():
            sparse.W_enc_frozen.normal_()
    else:
        sparse = tiny_model(**overrides)
    reference = copy.deepcopy(sparse)
    reference.config.kernels = "reference"
    return sparse.to(device), reference.to(device)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # dense core, frozen core
        dict(core_size=0),  # plain Matryoshka
        dict(sparsity="sparse_core", k=6),  # the core competes in the global BatchTopK
        dict(frozen_rows=3),  # a core with some trainable rows
        dict(sparsity="linear_core", frozen_rows=0),  # a learned linear block: signed, trained core latents
        dict(dead_latent_loss="ghost_grads"),  # dead latents at exp of their pre-activations
    ],
    ids=["dense-core", "no-core", "sparse-core", "partly-frozen-core", "learned-linear-core", "ghost-grads"],
)
def test_sparse_step_equals_the_reference_in_outputs_and_gradients(overrides, selection, decode_blocks, device):
    sparse, reference = paired_models(device, **overrides)
    for model in (sparse, reference):
        model.eval()  # BatchTopK (no threshold yet) without resetting the dead counters set here
        model.tokens_since_fired[60:90] = 10**9  # dead latents: the AuxK term is live
    x = torch.randn(96, 16, device=device) * 2
    x_sparse, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()  # ∂x: the path b_dec skips
    out_sparse, out_reference = sparse(x_sparse), reference(x_reference)
    for key in ("loss", "prefix_losses", "aux_loss", "latents", "reconstruction", "l0_core", "l0_noncore"):
        torch.testing.assert_close(out_sparse[key], out_reference[key], rtol=1e-5, atol=1e-5, msg=key)
    assert out_sparse.aux_loss > 0
    out_sparse.loss.backward()
    out_reference.loss.backward()
    for (name, p_sparse), (_, p_reference) in zip(sparse.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p_sparse.grad, p_reference.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(x_sparse.grad, x_reference.grad, rtol=1e-4, atol=1e-5)

    for model in (sparse, reference):  # training statistics: dead counters and the threshold
        model.train()(x)
    torch.testing.assert_close(sparse.threshold, reference.threshold)
    assert sparse.threshold > 0
    assert torch.equal(sparse.tokens_since_fired, reference.tokens_since_fired)


def test_sparse_step_under_bf16_autocast_follows_the_reference(device):
    sparse, reference = paired_models(device)
    x = torch.randn(96, 16, device=device) * 2
    losses = []
    for model in (sparse, reference):
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x)
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0.05, atol=0.05)
    cosine = torch.nn.functional.cosine_similarity(sparse.W_dec.grad.flatten(), reference.W_dec.grad.flatten(), dim=0)
    assert cosine > 0.98


def test_the_step_under_bf16_autocast_matches_fp32_within_bf16_rounding(device):
    """Tolerances: loss within 1% (measured ≤ 0.04% over 5 seeds), every gradient's cosine with fp32's ≥ 0.99
    (measured ≥ 0.997, the encoder's the lowest: its matmul runs in bf16), the same mask on ≥ 99% of entries (99.97%:
    only entries at the BatchTopK threshold flip)."""
    fp32 = tiny_model(dict_size=512, d_in=64, core_size=16, core_ids=[f"c:{i}" for i in range(16)], k=16)
    fp32 = fp32.to(device).train()
    bf16 = copy.deepcopy(fp32)
    x = torch.randn(512, 64, device=device) * 2
    expected = fp32(x)
    expected.loss.backward()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = bf16(x)
    out.loss.backward()
    assert abs(float(out.loss) - float(expected.loss)) <= 0.01 * float(expected.loss)
    for name in ("W_enc_trainable", "b_enc", "W_dec", "b_dec"):
        grad, reference = getattr(bf16, name).grad.float().flatten(), getattr(fp32, name).grad.flatten()
        assert torch.nn.functional.cosine_similarity(grad, reference, dim=0) >= 0.99, name
    assert ((out.latents > 0) == (expected.latents > 0)).float().mean() >= 0.99
    assert torch.equal(bf16.W_enc_frozen, fp32.W_enc_frozen)


def test_training_step_can_skip_the_dense_latents():
    model = tiny_model()
    model.train()
    out = model(torch.randn(32, 16), return_latents=False)
    assert out.latents is None and out.loss.requires_grad


def test_the_sparse_step_runs_on_bf16_weights_as_fsdp_mixed_precision_holds_them(device):
    sparse, reference = paired_models(device)
    for model in (sparse, reference):
        model.train()
    x = torch.randn(96, 16, device=device) * 2
    out = sparse.to(torch.bfloat16)(x)  # FSDP2's MixedPrecisionPolicy(param_dtype=bf16) casts the parameters
    out.loss.backward()
    assert sparse.W_dec.grad.dtype == torch.bfloat16 and torch.isfinite(sparse.W_dec.grad.float()).all()
    torch.testing.assert_close(out.loss, reference(x).loss, rtol=0.05, atol=0.05)


def test_a_second_step_before_the_first_backward_leaves_the_first_intact():
    """A step returns nothing that points into the reused CPU buffers (pre-activations, candidates, residuals), and
    its backward builds again what a later step overwrote there (the residuals)."""
    one, both = paired_models()[0], tiny_model()
    both.load_state_dict(one.state_dict())
    for model in (one, both):
        model.train()
    x1, x2 = torch.randn(96, 16) * 2, torch.randn(96, 16) * 2
    expected = one(x1)
    expected.loss.backward()
    first = both(x1)
    both(x2)  # overwrites every reused buffer before the first step's backward
    torch.testing.assert_close(first.reconstruction, expected.reconstruction, rtol=0, atol=0)
    first.loss.backward()
    for (name, p), (_, q) in zip(one.named_parameters(), both.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_a_second_backward_through_the_graph_gets_the_same_gradients():
    """The first backward turns the saved residuals into gradients in place; a second builds them again."""
    model = paired_models()[0].train()
    out = model(torch.randn(96, 16) * 2)
    out.loss.backward(retain_graph=True)
    first = {name: p.grad.clone() for name, p in model.named_parameters()}
    out.loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[name], rtol=0, atol=0, msg=name)


def test_reused_buffers_are_handed_out_again_until_released():
    cpu = torch.device("cpu")
    a = kernels.reused_cpu_buffer("test", (4, 8), torch.float32, cpu)
    assert kernels.reused_cpu_buffer("test", (2, 8), torch.float32, cpu).data_ptr() == a.data_ptr()
    assert kernels.reused_cpu_buffer("test", (8, 8), torch.float32, cpu).shape == (8, 8)  # grown
    assert kernels.reused_cpu_buffer("test", (8, 8), torch.float32, torch.device("meta")) is None  # a fresh tensor
    kernels.release_reused_buffers()
    assert "buffers" not in kernels._reused.__dict__
