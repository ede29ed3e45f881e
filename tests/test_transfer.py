import dataclasses
import json
import math
import re

import pytest
import torch
from conftest import core_of_rows, quiet_training_args, tiny_activation_args, tiny_model, tiny_run_data

from hf_dmsae import DMSAEModel
from hf_dmsae.data.slices import SliceLayout
from hf_dmsae.evaluation.saebench import SAEBenchArguments
from hf_dmsae.method.distillation import control_cores, random_core, random_core_generator
from hf_dmsae.method.transfer import Transfer, TransferArguments
from hf_dmsae.reporting.transfer import transfer_report
from hf_dmsae.run.arguments import SAEArguments, initial_model
from hf_dmsae.run.trainer import DMSAETrainingArguments
from hf_dmsae.run.training import load_trained_model
from hf_dmsae.utils.integrity import IntegrityError


def test_transfer_trains_every_variant_at_every_k_and_resumes(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    core = core_of_rows(torch.randn(6, 32) / 6)
    core.save_pretrained(tmp_path / "core")
    arguments = (
        TransferArguments(core=str(tmp_path / "core"), ks=[8, 16], ce_batches=2, model_repo="local/transfer"),
        SAEArguments(dict_size=256, k=8),
        tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), num_tokens=3000),
        quiet_training_args(tmp_path / "run", max_steps=15),
        SAEBenchArguments(saebench_evals=["meta_structure", "autointerp"], meta_structure_steps=5),
    )
    first = Transfer(*arguments)
    results = first.run()
    first.state.close()
    assert sorted(results) == [f"k{k}-{v}" for k in (16, 8) for v in ("dense_core", "matryoshka", "sparse_core")]
    for result in results.values():
        metrics = ("fvu", "l0", "l0_core", "l0_noncore", "dead_fraction", "ce_loss_recovered", "ce_loss_clean")
        assert all(math.isfinite(result[m]) for m in metrics) and result["fvu"] > 0
        assert math.isfinite(result["sb_meta_fve"]) and "skipped" in result["saebench"]["autointerp"]

    repos = sorted(p.name for p in (tmp_path / "run" / "repos").iterdir())
    assert repos == sorted(f"local__transfer-{name}" for name in results)
    card = (tmp_path / "run" / "repos" / repos[0] / "README.md").read_text()
    assert "## Held-out metrics" in card and "| fvu |" in card and "ce_loss_recovered" in card
    dense = DMSAEModel.from_pretrained(tmp_path / "run" / "k16-dense_core")
    assert torch.equal(dense.W_enc_frozen, core.encoder_rows) and dense.config.k_noncore == round(16 * 250 / 256)
    sparse = DMSAEModel.from_pretrained(tmp_path / "run" / "k16-sparse_core")
    assert sparse.config.sparsity == "sparse_core" and sparse.config.core_ids == core.latent_ids
    assert DMSAEModel.from_pretrained(tmp_path / "run" / "k16-matryoshka").config.core_size == 0

    weights = tmp_path / "run" / "k16-dense_core" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    rerun = Transfer(*arguments)
    assert rerun.run() == results and weights.stat().st_mtime_ns == before  # nothing retrained
    report = transfer_report(tmp_path / "run")
    assert "| 16 | sparse_core |" in report and "sb_meta_fve" in report and "- autointerp: " in report
    assert json.loads((tmp_path / "run" / "state.json").read_text())["results"] == results
    assert (tmp_path / "run" / "figures" / "metrics_vs_k.png").read_bytes().startswith(b"\x89PNG")
    assert "figures/metrics_vs_k.png" in report

    # Another core in the same output_dir is refused, not given the first core's results.
    other = dataclasses.replace(core, encoder_rows=core.encoder_rows + 1.0)
    other.save_pretrained(tmp_path / "other-core")
    rerun.state.close()
    # Settings none of its variants reads are not in its identity: the run at others is the same run.
    unread = dataclasses.replace(arguments[1], core_sparsity_coef=5.0, jumprelu_bandwidth=0.1, sparsity="linear_core")
    Transfer(arguments[0], unread, *arguments[2:]).state.close()
    with pytest.raises(ValueError, match="inputs.core: recorded"):
        Transfer(TransferArguments(core=str(tmp_path / "other-core"), ks=[8, 16], ce_batches=2), *arguments[1:])

    # A trained model is read back (for SAEBench, the controls, publishing) only while its bytes are the ones saved.
    assert torch.equal(load_trained_model(weights.parent).W_dec, dense.W_dec)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="k16-dense_core/model.safetensors changed since it was written"):
        load_trained_model(weights.parent)


def test_a_core_for_other_activations_is_refused_before_any_harvesting(tiny_lm_dir, tmp_path):
    for name, width, provenance in (("wide", 64, {}), ("layer", 32, {"hook_layer": 12, "hook_name": "resid_post"})):
        core_of_rows(torch.randn(4, width), provenance=provenance).save_pretrained(tmp_path / name)
    for name, difference in (
        ("wide", "width 64 (the run's activations: 32)"),
        ("layer", "layer 12 (the run's hook_layer: 2)"),
    ):
        with pytest.raises(ValueError, match=rf"selected for other activations: {re.escape(difference)}"):
            Transfer(
                TransferArguments(core=str(tmp_path / name), ks=[8]),
                SAEArguments(dict_size=256, k=8),
                tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache")),
                DMSAETrainingArguments(output_dir=str(tmp_path / "run")),
            )
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_random_core_variant_holds_the_distillation_controls_rows_in_either_sparsity_mode(tiny_lm_dir, tmp_path):
    core = core_of_rows(torch.randn(6, 32) / 6)
    core.save_pretrained(tmp_path / "core")
    transfer = Transfer(
        TransferArguments(core=str(tmp_path / "core"), ks=[8], variants=["random_dense_core", "random_sparse_core"]),
        SAEArguments(dict_size=256, k=8),
        tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), num_tokens=3000),
        DMSAETrainingArguments(output_dir=str(tmp_path / "run"), seed=3, report_to="none"),
    )
    control = random_core(core, 32, random_core_generator(3))
    for variant, sparsity in (("random_dense_core", "dense_core"), ("random_sparse_core", "sparse_core")):
        model = transfer.new_model(8, variant)
        assert torch.equal(model.W_enc_frozen, control.encoder_rows) and model.config.sparsity == sparsity
        assert model.config.core_ids == [f"random:{i}" for i in range(6)]
        assert model.config.k_noncore == (round(8 * 250 / 256) if sparsity == "dense_core" else 8)
    assert not torch.allclose(control.encoder_rows, core.encoder_rows / core.encoder_rows.norm(dim=1, keepdim=True))
    learned = transfer.new_model(8, "learned_linear_core")  # the dense baseline: the core's rank, nothing frozen
    assert learned.config.sparsity == "linear_core" and learned.config.frozen_rows == 0
    assert learned.config.core_ids == [f"learned:{i}" for i in range(6)] and learned.W_enc_frozen.numel() == 0
    assert learned.config.k_noncore == round(8 * 250 / 256)
    for variant in ("random_dense_core", "random_sparse_core", "matryoshka", "dense_core", "learned_linear_core"):
        model = transfer.new_model(8, variant)
        fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        with torch.no_grad():
            for parameter in model.parameters():  # as training moves it
                parameter.add_(1.0)
        rebuilt = initial_model(model, 3).state_dict()
        assert rebuilt.keys() == fresh.keys() and all(torch.equal(rebuilt[n], t) for n, t in fresh.items())


def test_a_trained_core_variant_holds_the_distillation_controls_trained_rows(tiny_lm_dir, tmp_path):
    core = core_of_rows(torch.randn(6, 32) / 6)
    core.save_pretrained(tmp_path / "core")
    last = tiny_model(d_in=32, dict_size=64, core_size=6, core_ids=core.latent_ids, cycle=4)  # the last cycle
    last.save_pretrained(tmp_path / "last")
    arguments = dict(core=str(tmp_path / "core"), ks=[8], variants=["trained_dense_core", "trained_sparse_core"])
    with pytest.raises(ValueError, match="built around a distillation's trained latents: give control_model"):
        TransferArguments(**arguments)
    transfer = Transfer(
        TransferArguments(**arguments, control_model=str(tmp_path / "last")),
        SAEArguments(dict_size=256, k=8),
        tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), num_tokens=3000),
        quiet_training_args(tmp_path / "run", seed=3),
    )
    controls = control_cores(core, 32, 3, last)  # what the distillation's control of seed 3 trains around
    assert torch.equal(
        controls["random_init"].encoder_rows, random_core(core, 32, random_core_generator(3)).encoder_rows
    )
    for variant, sparsity in (("trained_dense_core", "dense_core"), ("trained_sparse_core", "sparse_core")):
        model = transfer.new_model(8, variant)
        assert torch.equal(model.W_enc_frozen, controls["random_trained"].encoder_rows)
        assert model.config.sparsity == sparsity and len(model.config.core_ids) == 6
        assert all(i.startswith("cycle4:") and i not in core.latent_ids for i in model.config.core_ids)


def test_a_transfer_on_a_distillations_control_slice_reads_its_tokens_and_no_others(tiny_lm_dir, tmp_path):
    activations = tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), num_tokens=2000)
    data = tiny_run_data(tmp_path / "distillation", activations)  # a distillation's slices, its control last
    for name in ("cycle0", "control"):
        piece = data.training_slice(name, 2000)
        data.finish_slice(piece, data.training_data(piece, None))
    control = SliceLayout(json.loads((tmp_path / "distillation" / "state.json").read_text())["slices"]).get("control")
    core = core_of_rows(torch.randn(6, 32) / 6)
    core.save_pretrained(tmp_path / "core")

    def transfer(num_tokens: int) -> Transfer:
        return Transfer(
            TransferArguments(
                core=str(tmp_path / "core"),
                ks=[8],
                variants=["matryoshka"],
                ce_batches=0,
                control_slice_of=str(tmp_path / "distillation"),
            ),
            SAEArguments(dict_size=64, k=8),
            tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), num_tokens=num_tokens),
            quiet_training_args(tmp_path / f"run{num_tokens}", max_steps=3),
        )

    transfer(2000).train()
    layout = SliceLayout(json.loads((tmp_path / "run2000" / "state.json").read_text())["slices"])
    assert layout.get("control").to_dict() == control.to_dict() and layout.get("train") is None
    assert control.start.sequence > 0, "not the start of the training split, which the distillation read first"
    with pytest.raises(ValueError, match="control slice holds 2000 rows a reader; num_tokens=3000"):
        transfer(3000).train()


def test_every_variant_name_parses_into_what_its_models_are_built_around():
    from hf_dmsae.run.variants import VARIANTS, Variant

    parsed = {name: (v.core, v.mode) for name in VARIANTS if (v := Variant.parse(name))}
    assert parsed["dense_core"] == ("distilled", "dense_core") and parsed["matryoshka"] == ("none", "dense_core")
    assert parsed["random_jumprelu_core"] == ("random", "jumprelu_core")
    assert parsed["learned_linear_core"] == ("learned", "linear_core")
    assert Variant.parse("random_penalized_core").settings == ("core_sparsity_coef",)
    assert Variant.parse("jumprelu_core").settings == ("core_sparsity_coef", "jumprelu_bandwidth")
    with pytest.raises(ValueError, match="variant 'random_matryoshka' is not among"):
        Variant.parse("random_matryoshka")
