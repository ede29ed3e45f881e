import re

import pytest
import torch

from hf_dmsae import DMSAEConfig, matryoshka_group_sizes, noncore_k


def ids(n):
    return [f"cycle0:{i}" for i in range(n)]


def test_defaults_follow_saebench_groups_and_eq4():
    config = DMSAEConfig(d_in=2304, dict_size=65536, core_size=197, k=80, core_ids=ids(197))
    assert sum(config.group_sizes) == 65536 - 197
    assert config.group_sizes[:4] == [int((65536 - 197) * f) for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4)]
    assert config.k_noncore == round(80 * (65536 - 197) / 65536) == 80
    assert config.frozen_rows == 197
    assert config.aux_k == 1152
    assert config.prefix_ends[-1] == 65536 and config.prefix_ends[0] == 197 + config.group_sizes[0]


def test_eq4_scales_k_to_the_noncore_share():
    assert noncore_k(640, 4096, 1024) == 480
    assert noncore_k(20, 65536, 197) == 20
    assert matryoshka_group_sizes(64) == [2, 4, 8, 16, 34]


def test_latent_ids_keep_core_identity_and_name_new_latents_by_cycle():
    config = DMSAEConfig(d_in=4, dict_size=6, core_size=2, k=2, core_ids=["cycle0:7", "cycle1:3"], cycle=2)
    assert config.latent_ids() == ["cycle0:7", "cycle1:3", "cycle2:2", "cycle2:3", "cycle2:4", "cycle2:5"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dict_size=8, core_size=9, core_ids=ids(9)), "core_size"),
        (dict(dict_size=64, core_size=4, core_ids=ids(4), group_sizes=[10, 10]), "group_sizes"),
        (dict(dict_size=64, core_size=4, core_ids=ids(4), k_noncore=61), "k_noncore"),
        (dict(dict_size=64, sparsity="topk"), "sparsity"),
        (dict(dict_size=64, core_size=4, core_ids=ids(3)), "core_ids"),
        (dict(dict_size=64, core_size=2, core_ids=["a", "a"]), "core_ids"),
        (dict(dict_size=64, core_size=2, core_ids=ids(2), frozen_rows=3), "frozen_rows"),
        (dict(dict_size=64, k=0), "k"),
        (dict(dict_size=64, norm_factor=0.0), "norm_factor"),
        (dict(dict_size=64, group_sizes=[0, 64]), "group_sizes"),
    ],
)
def test_invalid_configs_raise_one_clear_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"DMSAEConfig\.{field}="):
        DMSAEConfig(**{"d_in": 8, "k": 4, **kwargs})


def test_sparse_core_k_is_checked_against_the_whole_dictionary():
    DMSAEConfig(d_in=8, dict_size=64, core_size=60, core_ids=ids(60), k=32, k_noncore=4, sparsity="sparse_core")
    with pytest.raises(ValueError, match=r"DMSAEConfig\.k="):
        DMSAEConfig(d_in=8, dict_size=64, k=65, k_noncore=4, sparsity="sparse_core")


@pytest.mark.parametrize("field, value", [("k", "16"), ("dict_size", 64.0), ("sparsity", 1), ("core_ids", "a,b")])
def test_a_value_of_the_wrong_type_gets_an_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DMSAEConfig\.{field}=.* must be of type"):
        DMSAEConfig(**{"d_in": 8, "dict_size": 64, "k": 4, field: value})


def test_sae_arguments_are_checked_when_parsed_before_any_harvesting():
    from hf_dmsae.run.arguments import SAEArguments

    with pytest.raises(ValueError, match=r"DMSAEConfig.k=5000 is invalid: must not exceed dict_size=4096"):
        SAEArguments(dict_size=4096, k=5000)
    with pytest.raises(ValueError, match="group_fractions=.* is invalid"):
        SAEArguments(group_fractions=[0.5, 0.6])


BAD_VALUES = [
    ("learning_rate", "0"),
    ("learning_rate", "-1e-3"),
    ("learning_rate", "nan"),
    ("learning_rate", "inf"),
    ("per_device_train_batch_size", "0"),
    ("gradient_accumulation_steps", "0"),
    ("decay_fraction", "1.5"),
    ("q", "0"),
    ("q", "1"),
    ("tau", "0"),
    ("num_tokens", "0"),
    ("eval_tokens", "-1"),
    ("aux_coef", "nan"),
    ("threshold_beta", "1"),
    ("cycle0_k", "0"),
    ("num_cycles", "0"),
    ("model_repo", ".."),
    ("calibrate_threshold_rows", "-1"),
    ("attribution_tokens", "0"),
    ("stop_cycles_at_overlap", "2"),
    ("ig_steps", "0"),
    ("scorer_tokens", "-1"),
    ("selection_patience", "0"),
]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_every_argument_of_the_main_job_is_range_checked_when_parsed(field, value, tmp_path):
    from hf_dmsae.data.activations import ActivationArguments
    from hf_dmsae.method.attribution import AttributionArguments
    from hf_dmsae.method.distillation import DistillationArguments
    from hf_dmsae.run.arguments import SAEArguments
    from hf_dmsae.run.launch import parse_arguments
    from hf_dmsae.run.trainer import DMSAETrainingArguments

    classes = (DistillationArguments, SAEArguments, ActivationArguments, AttributionArguments, DMSAETrainingArguments)
    with pytest.raises(ValueError) as refused:
        parse_arguments(classes, ["--output_dir", str(tmp_path), f"--{field}={value}"])
    given = re.search(rf"\b{field}='?([^\s':]+)", str(refused.value))  # the message names the field and its bad value
    assert given and (given[1] == value or float(given[1]) == float(value)), refused.value


def test_one_rule_sets_k_noncore_for_every_stage():
    from hf_dmsae.run.arguments import SAEArguments, k_noncore_for

    sae = SAEArguments(dict_size=4096, k=64)
    assert k_noncore_for(sae, reference_core_size=0) == 64, "a distillation's cycles: k, as cycle 0 has no core"
    assert k_noncore_for(sae, reference_core_size=120) == noncore_k(64, 4096, 120) == 62, "transfer: Eq. 4"
    assert k_noncore_for(SAEArguments(dict_size=4096, k=64, k_noncore=40), reference_core_size=120) == 40


def test_the_sae_arguments_are_the_configs_own_fields():
    import dataclasses

    from hf_dmsae.run.arguments import CLI_DEFAULTS, SAE_FIELDS, SAEArguments

    config_fields = {f.name: f for f in dataclasses.fields(DMSAEConfig)}
    for f in dataclasses.fields(SAEArguments):
        if f.name in SAE_FIELDS:
            default = CLI_DEFAULTS.get(f.name, config_fields[f.name].default)
            assert (f.default, f.metadata["help"]) == (default, config_fields[f.name].metadata["help"]), f.name
    assert {f.name for f in dataclasses.fields(SAEArguments)} == {*SAE_FIELDS, "group_fractions"}
    with pytest.raises(ValueError, match="DMSAEConfig.sparsity='topk' is invalid: must be of type str, one of"):
        SAEArguments(dict_size=64, k=4, sparsity="topk")


@pytest.mark.parametrize(
    "field, value", [("core_sparsity_coef", "inf"), ("jumprelu_bandwidth", "inf"), ("core_sparsity_coef", "nan")]
)
def test_a_core_penalty_setting_that_is_not_finite_is_refused_when_parsed(field, value, tmp_path):
    """An infinite bandwidth trains thresholds that never move, an infinite coefficient fails only after training."""
    from hf_dmsae.run.arguments import SAEArguments
    from hf_dmsae.run.launch import parse_arguments

    with pytest.raises(ValueError, match=rf"DMSAEConfig\.{field}=(inf|nan) is invalid: must be finite"):
        parse_arguments((SAEArguments,), ["--sparsity", "jumprelu_core", f"--{field}={value}"])


def test_num_train_epochs_is_read_as_whole_passes_over_the_slice_not_ignored(tmp_path):
    import dataclasses

    from hf_dmsae.run.trainer import DMSAETrainingArguments
    from hf_dmsae.run.training import training_steps

    assert DMSAETrainingArguments(output_dir=str(tmp_path)).num_train_epochs == 1  # what `--help` shows is done
    args = DMSAETrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=100)
    assert training_steps(1050, args) == 30  # 10 whole batches a pass
    with pytest.raises(ValueError, match="max_steps=31 is invalid: .* 10 optimiser steps of 100 rows a pass, 3 pass"):
        training_steps(1050, dataclasses.replace(args, max_steps=31))
    for passes in (0.5, 2.5):
        with pytest.raises(ValueError, match=f"num_train_epochs={passes} is invalid: passes .* a whole number"):
            DMSAETrainingArguments(output_dir=str(tmp_path), num_train_epochs=passes)


def test_bf16_on_a_cpu_without_native_bf16_warns_once_naming_the_flag(tmp_path, monkeypatch, caplog):
    """The capability probe stands in for the machine: this CPU's own answer decides nothing here."""
    from hf_dmsae.run import trainer

    trainer.warn_slow_cpu_bf16.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for _ in range(2):
        trainer.DMSAETrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True)
    warnings = [r for r in caplog.records if "--bf16 on this CPU" in r.getMessage()]
    assert len(warnings) == 1 and "several times slower than in fp32" in warnings[0].getMessage()
    trainer.warn_slow_cpu_bf16.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    caplog.clear()
    trainer.DMSAETrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True)
    assert not [r for r in caplog.records if "--bf16 on this CPU" in r.getMessage()]
    trainer.warn_slow_cpu_bf16.cache_clear()


def test_every_sparsity_mode_has_its_rules_and_only_jumprelu_learns_thresholds():
    from hf_dmsae.model.configuration_dmsae import SPARSITY_MODES
    from hf_dmsae.model.sparsity import CORE_MODES

    assert set(CORE_MODES) == set(SPARSITY_MODES)
    configs = {
        mode: DMSAEConfig(d_in=8, dict_size=64, core_size=4, k=8, core_ids=ids(4), sparsity=mode) for mode in CORE_MODES
    }
    assert [m for m, c in configs.items() if not c.core_unmasked] == ["sparse_core"]
    assert [m for m, c in configs.items() if c.core_linear] == ["linear_core"]
    assert [m for m, c in configs.items() if c.core_penalty] == ["penalized_core", "jumprelu_core"]
    assert [m for m, c in configs.items() if c.core_mode.learned_thresholds] == ["jumprelu_core"]
