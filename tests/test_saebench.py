import json

import pytest
import torch
from conftest import tiny_activation_args

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.data.language_model import LayerActivations, load_language_model
from hf_dmsae.evaluation.saebench import SAEBenchArguments, SAEBenchRunner, headline_metrics
from hf_dmsae.evaluation.saebench_sae import SAEBenchSAE, transformer_lens_name


def trained_sae(norm_factor: float = 3.0) -> DMSAEModel:
    """A tiny DMSAE with a core, hooked at block 2 of the tiny LM, with a learned threshold."""
    torch.manual_seed(0)
    config = DMSAEConfig(
        d_in=32,
        dict_size=128,
        core_size=8,
        k=8,
        core_ids=[f"cycle0:{i}" for i in range(8)],
        norm_factor=norm_factor,
        hook_layer=2,
        hook_name="resid_post",
        threshold_beta=0.5,
    )
    sae = DMSAEModel.from_core(config, torch.nn.functional.normalize(torch.randn(8, 32), dim=1))
    for _ in range(5):
        sae(torch.randn(256, 32) * norm_factor)
    return sae.eval()


def test_adapter_meets_saebench_contract_in_raw_units():
    sae = trained_sae()
    adapter = SAEBenchSAE(sae, "tiny")
    assert adapter.W_enc.shape == (32, 128) and adapter.W_dec.shape == (128, 32)
    assert (
        adapter.cfg.d_sae == 128 and adapter.cfg.hook_name == "blocks.2.hook_resid_post" and adapter.cfg.hook_layer == 2
    )
    assert adapter.dtype == torch.float32 and adapter.check_decoder_norms()
    x = torch.randn(2, 7, 32) * 3.0
    latents = adapter.encode(x)
    torch.testing.assert_close(latents, sae.encode(x) * 3.0)
    torch.testing.assert_close(adapter.decode(latents), sae.decode(sae.encode(x)))
    torch.testing.assert_close(adapter(x), adapter.decode(latents))
    # The exported weights act on raw activations exactly as encode does (before the mask).
    pre = torch.relu((x - adapter.b_dec) @ adapter.W_enc + adapter.b_enc)
    torch.testing.assert_close(latents[..., :8], pre[..., :8])


def test_transformer_lens_loads_a_local_model_by_its_registered_name(tiny_lm_dir):
    from transformer_lens import HookedTransformer

    name = transformer_lens_name(str(tiny_lm_dir))
    assert name == tiny_lm_dir.name and transformer_lens_name(str(tiny_lm_dir)) == name
    assert transformer_lens_name("gpt2") == "gpt2"  # TransformerLens's own names are left alone
    hooked = HookedTransformer.from_pretrained_no_processing(name, device="cpu")
    lm, tokenizer = load_language_model(str(tiny_lm_dir))
    input_ids = tokenizer(["The cat sat on the mat."], return_tensors="pt").input_ids
    _, cache = hooked.run_with_cache(input_ids, names_filter=["blocks.2.hook_resid_post"])
    torch.testing.assert_close(
        cache["blocks.2.hook_resid_post"], LayerActivations(lm, 2, "resid_post")(input_ids), rtol=1e-4, atol=1e-4
    )


def test_runner_writes_saebench_results_and_skips_what_is_unreachable(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    args = SAEBenchArguments(
        saebench_evals=["core", "meta_structure", "scr", "autointerp", "absorption"],
        core_batches=2,
        core_batch_prompts=4,
        core_variance_batches=1,
        meta_structure_steps=20,
    )
    runner = SAEBenchRunner(args, tiny_activation_args(tiny_lm_dir), tmp_path)
    results = runner.run("tiny-dmsae", trained_sae())

    core = results["core"]["metrics"]
    assert 0 < core["sparsity.l0"] < 128 and core["token_stats.total_tokens_eval_reconstruction"] == 2 * 4 * 32
    assert 0 <= core["misc_metrics.frac_alive"] <= 1
    assert "meta_structure.decoder_fraction_variance_explained" in results["meta_structure"]["metrics"]
    assert "LabHC/bias_in_bios_class_set1" in results["scr"]["skipped"]
    assert "OPENAI_API_KEY" in results["autointerp"]["skipped"]
    assert "--absorption_on_cpu true" in results["absorption"]["skipped"]  # hours a model on a CPU: asked for only
    assert not (tmp_path / "absorption").exists()
    stored = json.loads((tmp_path / "core" / "tiny-dmsae_custom_sae_eval_results.json").read_text())
    assert stored["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(core["sparsity.l0"])
    assert set(headline_metrics(results)) == {
        "sb_ce_loss_score",
        "sb_kl_div_score",
        "sb_explained_variance",
        "sb_meta_fve",
    }

    before = (tmp_path / "core" / "tiny-dmsae_custom_sae_eval_results.json").stat().st_mtime_ns
    assert runner.run("tiny-dmsae", trained_sae())["core"] == results["core"]
    assert (tmp_path / "core" / "tiny-dmsae_custom_sae_eval_results.json").stat().st_mtime_ns == before


def test_unknown_evals_and_probe_datasets_are_refused(tiny_lm_dir, tmp_path):
    with pytest.raises(ValueError, match="'mdl'"):
        SAEBenchArguments(saebench_evals=["core", "mdl"])
    runner = SAEBenchRunner(
        SAEBenchArguments(probe_datasets=["no_such_dataset"]), tiny_activation_args(tiny_lm_dir), tmp_path
    )
    with pytest.raises(ValueError, match="no_such_dataset"):
        runner._config("sparse_probing_sae_probes")


def test_saebench_evals_can_be_emptied_from_the_command_line():
    from hf_dmsae.run.launch import parse_arguments

    (args,) = parse_arguments((SAEBenchArguments,), ["--saebench_evals", "none"])
    assert args.saebench_evals == []
    (args,) = parse_arguments((SAEBenchArguments,), ["--saebench_evals", "core", "absorption"])
    assert args.saebench_evals == ["core", "absorption"]
