import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoConfig, AutoModel

from hf_dmsae import DMSAEModel
from hf_dmsae.model import modeling_dmsae
from hf_dmsae.model.modeling_dmsae import SparseLatents


def naive_latents(model: DMSAEModel, x: torch.Tensor) -> torch.Tensor:
    """BatchTopK by sorting, from the joined weights: the reference the model's masks must match. Its matmul rounds
    differently from the model's, so compare values with a tolerance and masks exactly."""
    config = model.config
    z = torch.relu((x - model.b_dec) @ model.W_enc.T + model.b_enc)
    start = config.first_masked_latent
    tail = z[:, start:]
    kth_largest = tail.flatten().sort(descending=True).values[config.topk_per_row * x.shape[0] - 1]
    return torch.cat([z[:, :start], tail * (tail >= kth_largest)], dim=1)


def assert_same_latents(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The same entries kept (exactly) with the same values (to rounding)."""
    assert torch.equal(actual > 0, expected > 0)
    torch.testing.assert_close(actual, expected)


def test_save_then_automodel_reload_is_bit_identical(model, tmp_path):
    model.train()
    for _ in range(3):  # move the threshold and counters off their initial values
        model(torch.randn(32, 16))
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)

    assert type(reloaded) is DMSAEModel
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    saved, loaded = model.config.to_dict(), reloaded.config.to_dict()
    assert loaded.pop("_name_or_path") == str(tmp_path)
    saved.pop("_name_or_path")
    assert loaded == saved
    assert json.loads((tmp_path / "config.json").read_text())["threshold"] == pytest.approx(float(model.threshold))

    model.eval(), reloaded.eval()
    x = torch.randn(32, 16)
    expected, actual = model(x), reloaded(x)
    for key in expected.keys():
        assert torch.equal(expected[key], actual[key]), key


def test_saved_folder_loads_with_trust_remote_code_without_the_package(model, tmp_path):
    model.save_pretrained(tmp_path / "repo")
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / "repo")!r}, trust_remote_code=True)
assert "hf_dmsae" not in sys.modules, "the package was imported"
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
expected = torch.load({str(tmp_path / "expected.pt")!r})
assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
print("remote-code-ok")
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "remote-code-ok" in result.stdout, result.stderr[-3000:]


def test_autoconfig_knows_the_model_type():
    assert AutoConfig.for_model("dmsae", d_in=4, dict_size=8, k=2).__class__.__name__ == "DMSAEConfig"


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_frozen_rows_stay_bit_identical_while_everything_else_trains(autocast, device):
    model = tiny_model().to(device)
    model.train()
    frozen = model.W_enc_frozen.clone()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert not any(p is model.W_enc_frozen for group in optimizer.param_groups for p in group["params"])

    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        x = torch.randn(64, 16, generator=generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).loss
        loss.backward()
        model.remove_parallel_decoder_grad()
        optimizer.step()
        optimizer.zero_grad()
        model.normalize_decoder()

    assert model.W_enc_frozen.dtype == torch.float32
    assert torch.equal(model.W_enc_frozen.view(torch.int32), frozen.view(torch.int32))
    assert torch.equal(model.W_enc[:8], frozen)
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not move"
    assert not torch.equal(model.b_enc[:8], before["b_enc"][:8]), "core encoder biases must train"
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(128, device=device))


def test_decoder_gradient_loses_only_its_component_along_each_row(model):
    model.train()
    with torch.no_grad():
        model.W_dec.mul_(torch.rand(128, 1) + 0.5)  # rows off unit norm: the projection must divide by ‖W_j‖²
    model(torch.randn(64, 16) * 2).loss.backward()
    grad = model.W_dec.grad.clone()
    model.remove_parallel_decoder_grad()
    W, after = model.W_dec.detach(), model.W_dec.grad
    assert ((after * W).sum(1).abs() <= 1e-5 * grad.norm(dim=1) * W.norm(dim=1)).all()  # orthogonal up to rounding
    removed = grad - after
    parallel = W * ((grad * W).sum(1) / (W * W).sum(1)).unsqueeze(1)
    torch.testing.assert_close(removed, parallel, rtol=1e-4, atol=1e-6)
    assert removed.abs().max() > 1e-4  # there was a parallel part to remove


def test_dense_core_never_masks_the_core_and_keeps_k_noncore_per_row(model):
    model.train()
    x = torch.randn(64, 16)
    latents = model(x).latents
    z = torch.relu((x - model.b_dec) @ model.W_enc.T + model.b_enc)
    torch.testing.assert_close(latents[:, :8], z[:, :8])
    assert (latents[:, :8] > 0).any()
    assert int((latents[:, 8:] > 0).sum()) == model.config.k_noncore * 64
    assert_same_latents(latents, naive_latents(model, x))


def test_sparse_core_keeps_k_per_row_over_all_latents():
    model = tiny_model(sparsity="sparse_core", k=6)
    model.train()
    x = torch.randn(64, 16)
    latents = model(x).latents
    assert int((latents > 0).sum()) == 6 * 64
    assert_same_latents(latents, naive_latents(model, x))


@pytest.mark.parametrize("core_size", [0, 8])
def test_every_prefix_loss_equals_a_naive_recomputation(core_size):
    model = tiny_model(core_size=core_size)
    model.eval()  # BatchTopK (no threshold yet) without updating the dead counters set here
    model.tokens_since_fired[40:] = 10**9  # some dead latents, so the AuxK term is live
    x = torch.randn(64, 16)
    out = model(x)
    latents = naive_latents(model, x)
    expected = []
    for end in model.config.prefix_ends:
        reconstruction = latents[:, :end] @ model.W_dec[:end] + model.b_dec
        expected.append((x - reconstruction).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.prefix_losses, torch.stack(expected))
    assert len(out.prefix_losses) == len(model.config.group_sizes)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.prefix_losses.sum() + out.aux_loss / 32)
    torch.testing.assert_close(out.reconstruction, latents @ model.W_dec + model.b_dec)


def test_dictionary_learning_weighting_divides_the_prefix_losses_by_g_squared():
    paper, weighted = tiny_model(), tiny_model(prefix_loss_weighting="dictionary_learning")
    weighted.load_state_dict(paper.state_dict())
    for m in (paper, weighted):
        m.eval()
        m.tokens_since_fired[40:] = 10**9  # a live AuxK term, whose relative weight the weighting changes
    x = torch.randn(64, 16)
    a, b = paper(x), weighted(x)
    assert torch.equal(a.prefix_losses, b.prefix_losses) and torch.equal(a.aux_loss, b.aux_loss) and a.aux_loss > 0
    groups = len(a.prefix_losses)
    torch.testing.assert_close(b.loss, a.prefix_losses.sum() / groups**2 + a.aux_loss / 32)
    with pytest.raises(ValueError, match="prefix_loss_weighting"):
        tiny_model(prefix_loss_weighting="mean")


@pytest.mark.parametrize("kernels", ["sparse", "reference"])
def test_a_penalized_core_is_a_dense_core_whose_loss_adds_its_l1_and_trains_sparser(kernels):
    """`penalized_core` masks as `dense_core` (the core outside the budget), its loss adds `core_sparsity_coef`
    times the core's mean summed activation, and the same training from the same start leaves its core firing less."""
    dense, penalized = (
        tiny_model(kernels=kernels),
        tiny_model(kernels=kernels, sparsity="penalized_core", core_sparsity_coef=5.0),
    )
    penalized.load_state_dict(dense.state_dict())
    x = torch.randn(64, 16)
    a, b = dense.train()(x), penalized.train()(x)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.prefix_losses, b.prefix_losses)
    torch.testing.assert_close(b.core_sparsity, a.latents[:, :8].sum(1).mean())
    torch.testing.assert_close(b.loss, a.loss + 5.0 * b.core_sparsity)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 16, generator=generator) for _ in range(60)]
    for model in (dense, penalized):
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
        for batch in batches:
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert penalized(x).l0_core < 0.75 * dense(x).l0_core  # 1.6 against 3.0 core latents a row


@pytest.mark.parametrize("kernels", ["sparse", "reference"])
def test_a_jumprelu_core_keeps_a_core_latent_only_above_its_learned_threshold(kernels, tmp_path):
    """`jumprelu_core`: each core latent has a threshold (a parameter, trained through JumpReLU's straight-through
    gradient by the L0 penalty), the non-core latents are masked as in `dense_core`, the penalty is the core's active
    latents per row, and the thresholds rise in training until the core fires less; they are saved and reloaded."""
    dense = tiny_model(kernels=kernels)
    jump = tiny_model(kernels=kernels, sparsity="jumprelu_core", core_sparsity_coef=0.5, jumprelu_bandwidth=0.05)
    jump.load_state_dict(dense.state_dict(), strict=False)
    assert torch.allclose(jump.core_log_threshold.exp(), torch.tensor(0.001))
    with torch.no_grad():
        jump.core_log_threshold.copy_(torch.linspace(-3, 0, 8))  # thresholds e^-3 … 1
    x = torch.randn(64, 16)
    a, b = dense.train()(x), jump.train()(x)
    z = a.latents[:, :8]
    threshold = jump.core_log_threshold.exp()
    torch.testing.assert_close(b.latents[:, :8], z * (z > threshold))
    assert torch.equal(a.latents[:, 8:] > 0, b.latents[:, 8:] > 0)
    torch.testing.assert_close(b.core_sparsity, (z > threshold).float().sum(1).mean())
    b.loss.backward()
    assert jump.core_log_threshold.grad is not None and jump.core_log_threshold.grad.abs().sum() > 0
    with torch.no_grad():  # from the initial thresholds, the L0 penalty raises every one
        jump.core_log_threshold.fill_(math.log(0.001))
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(jump.parameters(), lr=3e-2)
    for _ in range(30):
        jump(torch.randn(64, 16, generator=generator)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (jump.core_log_threshold > math.log(0.001)).all()
    jump.save_pretrained(tmp_path)
    reloaded = DMSAEModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.core_log_threshold, jump.core_log_threshold)
    torch.testing.assert_close(reloaded.eval().encode(x), jump.eval().encode(x))


@pytest.mark.parametrize("kernels", ["sparse", "reference"])
def test_a_linear_core_reads_out_signed_values_outside_the_budget(kernels, tmp_path):
    """`linear_core`: the core's latents are its linear pre-activations, negative ones included (every core latent
    active on every row), decoded as any latent, while the non-core latents are masked as in `dense_core`; a learned
    block (`frozen_rows=0`) trains its rows through negative values as well; formats that rectify every latent
    refuse it."""
    from hf_dmsae import save_sae_lens

    dense = tiny_model(kernels=kernels)
    linear = tiny_model(kernels=kernels, sparsity="linear_core")
    linear.load_state_dict(dense.state_dict())
    x = torch.randn(64, 16)
    a, b = dense.train()(x), linear.train()(x)
    read_out = (x - linear.b_dec) @ linear.W_enc[:8].T + linear.b_enc[:8]
    assert (read_out < 0).float().mean() > 0.3
    torch.testing.assert_close(b.latents[:, :8], read_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.latents[:, 8:], b.latents[:, 8:])
    assert b.l0_core == 8 and a.l0_core < 8
    torch.testing.assert_close(b.reconstruction, linear.decode(b.latents), rtol=1e-5, atol=1e-5)

    learned = DMSAEModel(tiny_config(kernels=kernels, sparsity="linear_core", frozen_rows=0))
    learned.train()(x).loss.backward()
    core_grad = learned.W_enc_trainable.grad[:8]
    assert (core_grad.norm(dim=1) > 0).all()  # a ReLU core's rows below zero on every row would get none
    learned.eval()
    with pytest.raises(ValueError, match="signed core latents"):
        save_sae_lens(learned, tmp_path / "sae_lens")


@pytest.mark.parametrize("kernels", ["sparse", "reference"])
def test_a_frozen_core_bias_never_moves_while_the_other_biases_train(kernels):
    model = tiny_model(train_core_bias=False, kernels=kernels)
    model.train()
    model.tokens_since_fired[:4] = 10**9  # dead core latents: AuxK reaches their bias too, if anything does
    before = model.b_enc.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        model(torch.randn(64, 16, generator=generator)).loss.backward()
        assert not model.b_enc.grad[:8].any()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(model.b_enc[:8], before[:8])
    assert not torch.equal(model.b_enc[8:], before[8:])


def test_aux_loss_is_zero_without_dead_latents_and_trains_only_dead_encoders(model):
    model.eval()  # BatchTopK (no threshold yet) without updating the dead counters set here
    x = torch.randn(64, 16)
    assert model(x).aux_loss == 0
    model.tokens_since_fired[100:] = model.config.dead_tokens_threshold
    model(x).aux_loss.backward()
    grad = model.W_enc_trainable.grad  # row j holds latent j + frozen_rows
    assert grad[100 - 8 :].abs().sum() > 0
    assert grad[: 100 - 8].abs().sum() == 0


def test_ghost_grads_equal_the_reference_and_reach_latents_that_never_reach_zero():
    """Ghost grads against their plain formula (SAELens 2.x's, without the row shift), and the reason to have them:
    a dead latent whose pre-activation is below 0 on every row moves under ghost grads and not under AuxK."""
    ghost, auxk = tiny_model(dead_latent_loss="ghost_grads"), tiny_model()
    x = torch.randn(64, 16)
    with torch.no_grad():
        for m in (ghost, auxk):
            m.b_enc[100:] = -3.0 - (x - m.b_dec).norm(dim=1).max()  # below 0 on every row: |w·x| ≤ ‖x‖
    for m in (ghost, auxk):
        m.eval()  # BatchTopK (no threshold yet) without updating the dead counters set here
        m.tokens_since_fired[100:] = m.config.dead_tokens_threshold
    out = ghost(x)
    residual = (x - out.reconstruction).detach()
    pre = (x - ghost.b_dec) @ ghost.W_enc[100:].T + ghost.b_enc[100:]
    reference = pre.exp() @ ghost.W_dec[100:]
    reference = reference * (residual.norm(dim=1, keepdim=True) / (2 * reference.norm(dim=1, keepdim=True))).detach()
    variance = (residual - residual.mean(0)).pow(2).sum(1).mean()
    torch.testing.assert_close(out.aux_loss, (residual - reference).pow(2).sum(1).mean() / variance, rtol=1e-4, atol=0)
    out.aux_loss.backward()
    assert ghost.W_enc_trainable.grad[100 - 8 :].abs().sum(1).min() > 0, "every dead encoder row is pulled"
    assert ghost.b_enc.grad[100:].abs().min() > 0
    auxk(x).aux_loss.backward()
    assert auxk.b_enc.grad[100:].abs().sum() == 0, "AuxK's ReLU gives these latents no gradient"
    with pytest.raises(ValueError, match="dead_latent_loss"):
        tiny_model(dead_latent_loss="ghost")


def test_dead_counters_count_tokens_since_each_latent_fired(model):
    model.train()
    with torch.no_grad():
        model.b_enc[50] = -1e6  # latent 50 can never fire
        model.b_enc[3] = -1e6  # nor core latent 3 (counted from the dense core, not the kept entries)
    for _ in range(3):
        latents = model(torch.randn(32, 16)).latents
    assert model.tokens_since_fired[50] == 96 and model.tokens_since_fired[3] == 96
    fired_last = (latents > 0).any(0)
    assert (model.tokens_since_fired[fired_last] == 0).all()


def test_inference_uses_the_threshold_on_noncore_latents_only(model):
    model.train()
    for _ in range(20):
        model(torch.randn(64, 16))
    threshold = float(model.threshold)
    assert threshold > 0
    model.eval()
    x = torch.randn(64, 16)
    z = model._relu_preactivations(x / model.config.norm_factor)  # the same operations encode runs
    latents = model.encode(x)
    assert torch.equal(latents[:, :8], z[:, :8])
    assert torch.equal(latents[:, 8:], z[:, 8:] * (z[:, 8:] > threshold))
    torch.testing.assert_close(model.decode(latents), model(x).reconstruction)


@pytest.mark.parametrize("batch_size", [1000, 96])
def test_calibrated_threshold_is_the_smallest_value_batchtopk_keeps_over_all_rows(model, batch_size):
    x = torch.randn(1000, 16)
    model.calibrate_threshold(x, batch_size=batch_size)
    z = torch.relu((x - model.b_dec) @ model.W_enc.T + model.b_enc)[:, 8:]
    kept = int(model.config.topk_per_row * len(x))
    assert float(model.threshold) == pytest.approx(float(z.flatten().sort(descending=True).values[kept - 1]))
    model.eval()
    l0_noncore = (model.encode(x)[:, 8:] > 0).sum(1).float().mean()
    assert l0_noncore == pytest.approx(model.config.topk_per_row, abs=1.0 / len(x))


def test_raw_activations_in_and_out_with_a_norm_factor():
    plain, scaled = tiny_model(), tiny_model(norm_factor=10.0)
    plain.train(), scaled.train()
    x = torch.randn(64, 16)
    out_plain, out_scaled = plain(x), scaled(10.0 * x)
    torch.testing.assert_close(out_scaled.latents, out_plain.latents)
    torch.testing.assert_close(out_scaled.reconstruction, 10.0 * out_plain.reconstruction)
    torch.testing.assert_close(out_scaled.loss, out_plain.loss)


@pytest.mark.parametrize("threshold", [True, False])
def test_sparse_latents_are_encodes_entries_and_decode_alike(model, threshold, monkeypatch):
    """`encode_sparse` in blocks of 5 rows (threshold) or the whole batch (BatchTopK, no threshold yet) against the
    dense `encode` / `decode`: the same entries, values within fp32 rounding (the matmul blocks by rows)."""
    monkeypatch.setattr(modeling_dmsae, "SPARSE_BLOCK_VALUES", 5 * model.config.dict_size)
    if threshold:
        model.train()
        for _ in range(20):
            model(torch.randn(64, 16))
    model.eval()
    x = torch.randn(2, 37, 16)
    dense, sparse = model.encode(x).reshape(-1, 128), model.encode_sparse(x)
    assert sparse.shape == (74, 128)
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-6, atol=1e-6)
    assert torch.equal(sparse.rows * 128 + sparse.cols, (dense > 0).flatten().nonzero().squeeze(1))  # (row, col) order
    counts = sparse.active_counts(model.config.core_size)
    assert torch.equal(counts, torch.stack([(dense[:, :8] > 0).sum(1), (dense[:, 8:] > 0).sum(1)], dim=1))
    torch.testing.assert_close(model.decode_sparse(sparse), model.decode(dense), rtol=1e-5, atol=1e-5)


def test_encode_keeps_leading_dimensions(model):
    model.eval()
    assert model.encode(torch.randn(2, 5, 16)).shape == (2, 5, 128)


def test_decoder_bias_starts_at_the_geometric_median(model):
    points = torch.zeros(101, 16)
    points[:, 0] = torch.linspace(-1, 1, 101)
    points[-1, 1] = 1e4  # one far outlier drags the mean, not the median
    model.init_decoder_bias(points)
    assert model.b_dec.abs().max() < 1e-2


@pytest.mark.parametrize(
    "activations, message",
    [
        (torch.randn(4, 15), "last dimension d_in=16"),
        (torch.full((4, 16), float("nan")), "NaN or inf"),
        (torch.tensor([[float("inf")] + [0.0] * 15]), "NaN or inf"),
        (torch.ones(4, 16, dtype=torch.long), "floating-point"),
        (torch.empty(0, 16), "empty"),
    ],
)
def test_bad_activations_get_one_clear_error(model, activations, message):
    model.eval()  # a training step leaves the NaN check to the trainer's logging steps (test_trainer)
    with pytest.raises(ValueError, match=message):
        model(activations)
    with pytest.raises(ValueError, match=message):
        model.encode(activations)


def test_from_core_rejects_rows_that_do_not_fit_the_config(model):
    with pytest.raises(ValueError, match="d_in=16"):
        DMSAEModel.from_core(model.config, torch.randn(8, 15))
    with pytest.raises(ValueError, match="fully frozen core of 7 rows"):
        DMSAEModel.from_core(model.config, torch.randn(7, 16))


def test_weights_that_do_not_match_the_model_are_refused(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["W_encoder"] = weights.pop("W_enc_trainable")  # a renamed tensor, which would be re-initialised
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold this model's weights.*W_enc_trainable"):
        DMSAEModel.from_pretrained(tmp_path)


def test_decode_takes_latents_of_any_float_dtype(model):
    model.eval()
    latents = model.encode(torch.randn(8, 16))
    torch.testing.assert_close(model.decode(latents.bfloat16()), model.decode(latents), rtol=0.02, atol=0.05)
    with pytest.raises(ValueError, match="dict_size=128"):
        model.decode(torch.randn(8, 16))


FIXTURE_REPO = Path(__file__).resolve().parent / "fixtures" / "dmsae-repo-v0.1"


def test_a_repo_saved_by_version_0_1_loads_with_the_package_and_with_its_own_remote_code(tmp_path):
    """`tests/fixtures/dmsae-repo-v0.1` was written by `write_model_repo` at commit 6533813, before the package was
    laid out in subpackages; its outputs on a fixed input were saved beside it."""
    from safetensors.torch import load_file

    expected = load_file(FIXTURE_REPO.parent / "dmsae-repo-v0.1-outputs.safetensors")
    model = AutoModel.from_pretrained(FIXTURE_REPO).eval()
    assert isinstance(model, DMSAEModel) and model.config.core_size == 8
    output = model(expected["x"])
    torch.testing.assert_close(output.latents, expected["latents"])
    torch.testing.assert_close(output.reconstruction, expected["reconstruction"])
    script = f"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModel
model = AutoModel.from_pretrained({str(FIXTURE_REPO)!r}, trust_remote_code=True).eval()
assert "hf_dmsae" not in sys.modules, "the package was imported"
expected = load_file({str(FIXTURE_REPO.parent / "dmsae-repo-v0.1-outputs.safetensors")!r})
torch.testing.assert_close(model(expected["x"]).reconstruction, expected["reconstruction"])
print("remote-code-ok")
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "remote-code-ok" in result.stdout, result.stderr[-3000:]


def test_sparse_latents_in_any_entry_order_decode_as_their_dense_latents(model):
    """Entries out of row order (given by hand, or two `encode_sparse` results concatenated later rows first) decode
    as `decode(to_dense())`; the bags of `decode_sparse` would otherwise cut the wrong rows' entries."""
    model.train()
    for _ in range(20):  # a threshold, so that each half encodes as it does within the whole
        model(torch.randn(64, 16))
    model.eval()
    x = torch.randn(12, 16)
    whole = model.encode_sparse(x)
    first, second = model.encode_sparse(x[:6]), model.encode_sparse(x[6:])
    joined = SparseLatents(
        torch.cat([second.rows + 6, first.rows]),
        torch.cat([second.cols, first.cols]),
        torch.cat([second.values, first.values]),
        (12, 128),
    )
    torch.testing.assert_close(joined.to_dense(), whole.to_dense(), rtol=1e-6, atol=1e-6)  # the matmul blocks by rows
    torch.testing.assert_close(model.decode_sparse(joined), model.decode(whole.to_dense()), rtol=1e-5, atol=1e-5)
    by_hand = SparseLatents(torch.tensor([1, 0, 1]), torch.tensor([3, 5, 2]), torch.tensor([1.0, 2.0, 3.0]), (2, 128))
    torch.testing.assert_close(model.decode_sparse(by_hand), model.decode(by_hand.to_dense()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rows, cols, message",
    [([0, 2], [1, 1], r"rows must lie in \[0, 2\)"), ([-1, 0], [1, 1], "rows must lie"), ([0, 1], [1, 128], "cols")],
)
def test_sparse_latents_outside_their_shape_are_refused_by_name(rows, cols, message):
    with pytest.raises(ValueError, match=message):
        SparseLatents(torch.tensor(rows), torch.tensor(cols), torch.ones(2), (2, 128))


def test_an_encoder_that_overflows_is_an_error_not_infinite_latents(model):
    model.eval()
    with pytest.raises(ValueError, match="latent values are NaN or infinite: the encoder overflowed"):
        model.encode_sparse(torch.full((4, 16), 3e38))


def test_a_model_file_whose_header_announces_100_gb_is_refused_naming_the_folder(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    weights = tmp_path / "saved" / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 100 * 2**30) + weights.read_bytes()[8:])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'saved'}: its model.safetensors is unreadable"):
        DMSAEModel.from_pretrained(tmp_path / "saved")
