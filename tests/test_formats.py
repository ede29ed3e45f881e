import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from hf_dmsae.publishing.formats import (
    check_checkpoint_fits,
    load_cycle0,
    load_dictionary_learning,
    save_dictionary_learning,
    save_sae_lens,
)


def write_dictionary_learning_checkpoint(folder, d=16, n=64, k=4, group_sizes=(2, 4, 8, 16, 34)):
    """A checkpoint laid out as dictionary_learning's MatryoshkaBatchTopKTrainer saves it (SAEBench's releases)."""
    torch.manual_seed(0)
    decoder = torch.randn(n, d)
    state = {
        "W_enc": torch.randn(d, n) * 0.3,
        "b_enc": torch.randn(n) * 0.1,
        "W_dec": decoder / decoder.norm(dim=1, keepdim=True),
        "b_dec": torch.randn(d),
        "k": torch.tensor(k, dtype=torch.int),
        "threshold": torch.tensor(0.2),
        "group_sizes": torch.tensor(group_sizes),
    }
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    trainer = {
        "trainer_class": "MatryoshkaBatchTopKTrainer",
        "dict_class": "MatryoshkaBatchTopKSAE",
        "activation_dim": d,
        "dict_size": n,
        "k": k,
        "group_fractions": [g / n for g in group_sizes],
        "group_sizes": list(group_sizes),
        "layer": 12,
        "lm_name": "google/gemma-2-2b",
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 1024}}))
    return state


def test_dictionary_learning_checkpoint_loads_as_cycle_zero(tmp_path):
    state = write_dictionary_learning_checkpoint(tmp_path / "trainer_0")
    model = load_dictionary_learning(tmp_path / "trainer_0").eval()
    assert model.config.core_size == 0 and model.config.group_sizes == [2, 4, 8, 16, 34]
    assert model.config.k == 4 and model.config.hook_layer == 12 and model.config.base_model == "google/gemma-2-2b"
    assert model.config.latent_ids()[:2] == ["cycle0:0", "cycle0:1"]
    x = torch.randn(32, 16) * 3
    z = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    expected = z * (z > 0.2)
    torch.testing.assert_close(model.encode(x), expected)
    torch.testing.assert_close(model.decode(expected), expected @ state["W_dec"] + state["b_dec"])


def test_export_is_read_by_saebench_with_the_same_outputs(tmp_path):
    from sae_bench.custom_saes.batch_topk_sae import BatchTopKSAE

    model = tiny_model(core_size=0, norm_factor=3.0, k=6)
    model.train()
    for _ in range(5):
        model(torch.randn(64, 16) * 3)
    model.eval()
    save_dictionary_learning(model, tmp_path / "export")

    params = torch.load(tmp_path / "export" / "ae.pt")
    config = json.loads((tmp_path / "export" / "config.json").read_text())["trainer"]
    del params["group_sizes"]  # as SAEBench's Matryoshka loader does
    sae = BatchTopKSAE(
        d_in=16, d_sae=128, k=config["k"], model_name="m", hook_layer=0, device="cpu", dtype=torch.float32
    )
    sae.load_state_dict(params)
    assert sae.check_decoder_norms()
    x = torch.randn(32, 16) * 3
    torch.testing.assert_close(sae.encode(x), model.encode(x) * 3.0)
    torch.testing.assert_close(sae(x), model.decode(model.encode(x)))

    reloaded = load_dictionary_learning(tmp_path / "export").eval()
    torch.testing.assert_close(reloaded.decode(reloaded.encode(x)), model.decode(model.encode(x)))


@pytest.mark.parametrize("sparsity", ["dense_core", "penalized_core", "jumprelu_core", "linear_core"])
def test_a_core_outside_the_threshold_is_not_exported_to_dictionary_learning_with_its_activations_dropped(
    tmp_path, sparsity
):
    """dictionary_learning's one global threshold would drop the core's activations below it (and a JumpReLU core's
    own thresholds); a sparse core, under the threshold like every latent, is written as it is."""
    model = tiny_model(sparsity=sparsity)
    model.train()
    model(torch.randn(64, 16))
    model.eval()
    with pytest.raises(ValueError, match=f"a {sparsity} model|signed core latents"):
        save_dictionary_learning(model, tmp_path / sparsity)
    assert not (tmp_path / sparsity / "ae.pt").exists()
    sparse = tiny_model(sparsity="sparse_core")
    sparse.train()
    sparse(torch.randn(64, 16))
    save_dictionary_learning(sparse.eval(), tmp_path / "sparse_core")
    x = torch.randn(32, 16)
    state = torch.load(tmp_path / "sparse_core" / "ae.pt")
    z = torch.relu(x @ state["W_enc"] + state["b_enc"])
    torch.testing.assert_close(z * (z > state["threshold"]), sparse.encode(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparsity", ["dense_core", "jumprelu_core"])
def test_sae_lens_export_loads_with_sae_lens_and_gives_the_same_latents(tmp_path, sparsity):
    from sae_lens import SAE

    settings = dict(base_model="google/gemma-2-2b", hook_layer=12, hook_name="resid_post", sparsity=sparsity)
    model = tiny_model(norm_factor=4.0, **settings)
    if sparsity == "jumprelu_core":  # the core's own thresholds, e^-3 … 1
        with torch.no_grad():
            model.core_log_threshold.copy_(torch.linspace(-3, 0, model.config.core_size))
    with pytest.raises(ValueError, match="no inference threshold yet"):
        save_sae_lens(model, tmp_path / "too-early")
    model.train()
    for _ in range(5):
        model(torch.randn(64, 16) * 4)
    model.eval()
    save_sae_lens(model, tmp_path / "sae_lens")
    sae = SAE.load_from_disk(tmp_path / "sae_lens")  # SAELens' own loader
    assert sae.cfg.architecture() == "jumprelu" and sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    assert sae.cfg.metadata.dmsae["core_ids"] == model.config.core_ids

    x = torch.randn(256, 16) * 4
    with torch.no_grad():
        ours, theirs = model.encode(x), sae.encode(x)
        pre = model._relu_preactivations(x / 4.0)
        # The folded weights round differently: masks are compared where rounding cannot flip them, values to rounding.
        clear = (pre - model.threshold).abs() > 1e-4
        c = model.config.core_size
        clear[:, :c] = True if sparsity == "dense_core" else (pre[:, :c] - model.core_log_threshold.exp()).abs() > 1e-4
        assert torch.equal((ours > 0)[clear], (theirs > 0)[clear]) and (ours[:, : model.config.core_size] > 0).any()
        torch.testing.assert_close(theirs[clear], ours[clear], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(ours), model.decode(ours), rtol=1e-5, atol=1e-4)

    # And back: read as a cycle 0, the export gives the DMSAE's own encoder rows and unit decoder directions.
    back = load_cycle0(tmp_path / "sae_lens", k=model.config.k)
    torch.testing.assert_close(back.W_enc, model.W_enc.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.W_dec, model.W_dec.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.b_dec, model.b_dec.detach() * 4.0)  # raw units: the import reads raw activations


def write_sae_lens_sae(folder, architecture="topk", d=16, n=64, **settings):
    """A SAELens SAE with random weights and decoder rows of any norm, saved by SAELens' own `save_model`."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(
        model_name=settings.pop("model_name", "google/gemma-2-2b"),
        hook_name=settings.pop("hook_name", "blocks.12.hook_resid_post"),
    )
    cls, config_cls = {"topk": (TopKSAE, TopKSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}[architecture]
    sae = cls(config_cls(d_in=d, d_sae=n, metadata=metadata, **settings))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.rand_like(parameter) if parameter.ndim == 1 else torch.randn_like(parameter))
    sae.save_model(folder)
    return sae


def test_a_sae_lens_sae_loads_as_cycle_zero_with_unit_decoder_rows(tmp_path):
    sae = write_sae_lens_sae(tmp_path / "topk", k=4, apply_b_dec_to_input=False)
    model = load_cycle0(tmp_path / "topk")
    assert model.config.k == 4 and model.config.group_sizes == [64] and model.config.hook_layer == 12
    assert model.config.base_model == "google/gemma-2-2b" and model.config.latent_ids()[0] == "cycle0:0"
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(64))
    x = torch.randn(32, 16) * 3
    with torch.no_grad():
        # Each latent is the SAE's own activation times its decoder norm: the same contribution to the reconstruction.
        theirs = torch.relu(x @ sae.W_enc + sae.b_enc)
        torch.testing.assert_close(model._relu_preactivations(x), theirs * norms, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(theirs * norms), sae.decode(theirs), rtol=1e-5, atol=1e-4)

    # A SAE of another hook at the same layer and width is refused, as another layer is.
    run = SimpleNamespace(model_name_or_path="google/gemma-2-2b", hook_layer=12, hook_name="resid_post")
    check_checkpoint_fits(tmp_path / "topk", run, 16)
    write_sae_lens_sae(tmp_path / "mlp", k=4, hook_name="blocks.12.hook_mlp_out")
    with pytest.raises(
        ValueError, match=r"trained for another model: hook mlp_out \(the run's hook_name: resid_post\)"
    ):
        check_checkpoint_fits(tmp_path / "mlp", run, 16)

    write_sae_lens_sae(tmp_path / "jumprelu", "jumprelu")
    with pytest.raises(ValueError, match="records no k: give the BatchTopK target"):
        load_cycle0(tmp_path / "jumprelu")
    assert load_cycle0(tmp_path / "jumprelu", k=6).config.k == 6


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    poisoned = tensor.clone()
    poisoned.view(-1)[3] = float("nan")
    return poisoned


def test_every_loader_refuses_non_finite_weights_naming_the_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_dmsae import DMSAEModel
    from hf_dmsae.model.core import DMSAECore
    from hf_dmsae.utils.integrity import IntegrityError, save_tensors

    # SAELens: one NaN in W_enc would take a BatchTopK slot in every row and make cycle 0's FVU NaN.
    write_sae_lens_sae(tmp_path / "sae_lens", k=4)
    weights = tmp_path / "sae_lens" / "sae_weights.safetensors"
    save_file({**load_file(weights), "W_enc": _poison(load_file(weights)["W_enc"])}, weights)
    with pytest.raises(IntegrityError, match=r"sae_weights.safetensors: tensor 'W_enc' holds 1 NaN"):
        load_cycle0(tmp_path / "sae_lens")

    state = write_dictionary_learning_checkpoint(tmp_path / "dictionary_learning")
    torch.save({**state, "b_dec": _poison(state["b_dec"])}, tmp_path / "dictionary_learning" / "ae.pt")
    with pytest.raises(IntegrityError, match=r"ae.pt: tensor 'b_dec' holds 1 NaN"):
        load_cycle0(tmp_path / "dictionary_learning")

    # A core rewritten with a NaN score (and a digest to match) and a saved model with an infinite weight.
    rows = torch.randn(4, 16)
    core = DMSAECore(
        encoder_rows=rows,
        latent_ids=[f"cycle0:{i}" for i in range(4)],
        scores=torch.ones(4),
        pool_ids=["cycle0:0"],
        pool_scores=torch.ones(1),
        coverage_curve=torch.ones(1),
    )
    core.save_pretrained(tmp_path / "core")
    save_tensors(
        {
            "encoder_rows": rows,
            "scores": _poison(torch.ones(4)),
            "pool_scores": torch.ones(1),
            "coverage_curve": torch.ones(1),
        },
        tmp_path / "core" / "core.safetensors",
    )
    with pytest.raises(IntegrityError, match=r"core.safetensors: tensor 'scores' holds 1 NaN"):
        DMSAECore.from_pretrained(tmp_path / "core")
    model = tiny_model()
    with torch.no_grad():
        model.W_dec[5, 2] = float("inf")
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"model: the weights \['W_dec'\] hold NaN or infinite values"):
        DMSAEModel.from_pretrained(tmp_path / "model")


def test_foreign_checkpoints_of_inconsistent_shapes_or_without_a_usable_k_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_dmsae.utils.integrity import IntegrityError

    write_sae_lens_sae(tmp_path / "shapes", k=4)
    weights = tmp_path / "shapes" / "sae_weights.safetensors"
    save_file({**load_file(weights), "b_enc": torch.zeros(63)}, weights)
    with pytest.raises(
        IntegrityError, match=r"does not hold the SAE its config describes: b_enc is \[63\], not \[64\]"
    ):
        load_cycle0(tmp_path / "shapes")
    write_sae_lens_sae(tmp_path / "no_d_in", k=4)
    cfg = json.loads((tmp_path / "no_d_in" / "cfg.json").read_text())
    del cfg["d_in"]
    (tmp_path / "no_d_in" / "cfg.json").write_text(json.dumps(cfg))
    run = SimpleNamespace(model_name_or_path="google/gemma-2-2b", hook_layer=12, hook_name="resid_post")
    with pytest.raises(IntegrityError, match=r"no_d_in/cfg.json has no 'd_in'"):
        check_checkpoint_fits(tmp_path / "no_d_in", run, 16)
    write_sae_lens_sae(tmp_path / "jumprelu", "jumprelu")
    with pytest.raises(ValueError, match=r"k=65 cannot score its latents: a BatchTopK target in \[1, 64\]"):
        load_cycle0(tmp_path / "jumprelu", k=65)

    state = write_dictionary_learning_checkpoint(tmp_path / "groups")
    torch.save({**state, "group_sizes": torch.tensor([2, 4, 8])}, tmp_path / "groups" / "ae.pt")
    with pytest.raises(IntegrityError, match=r"group_sizes \[2, 4, 8\] do not split 64 latents"):
        load_cycle0(tmp_path / "groups")
    state = write_dictionary_learning_checkpoint(tmp_path / "k0")
    torch.save({**state, "k": torch.tensor(0)}, tmp_path / "k0" / "ae.pt")
    with pytest.raises(ValueError, match=r"k=0 cannot score its latents"):
        load_cycle0(tmp_path / "k0")


def test_a_safetensors_header_announcing_more_than_the_file_holds_is_refused_without_reading_it(tmp_path):
    import struct

    from hf_dmsae.model.core import DMSAECore
    from hf_dmsae.utils.integrity import IntegrityError

    core = DMSAECore(
        encoder_rows=torch.randn(2, 16),
        latent_ids=["cycle0:0", "cycle0:1"],
        scores=torch.ones(2),
        pool_ids=["cycle0:0"],
        pool_scores=torch.ones(1),
        coverage_curve=torch.ones(1),
    )
    core.save_pretrained(tmp_path / "core")
    weights = tmp_path / "core" / "core.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**40) + weights.read_bytes()[8:])
    with pytest.raises(IntegrityError, match=r"core.safetensors is not a readable .* header announces 1099511627776"):
        DMSAECore.from_pretrained(tmp_path / "core")


class _CodeOnLoad:
    def __reduce__(self):
        return (print, ("this ran while the checkpoint was read",))


def test_a_dictionary_learning_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    from hf_dmsae.utils.integrity import IntegrityError

    state = write_dictionary_learning_checkpoint(tmp_path / "trainer_0")
    torch.save({**state, "payload": _CodeOnLoad()}, tmp_path / "trainer_0" / "ae.pt")
    with pytest.raises(IntegrityError, match=r"ae.pt holds more than tensors and is not read .*GLOBAL print"):
        load_cycle0(tmp_path / "trainer_0")
    assert "this ran" not in capsys.readouterr().out
