import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HUB, tiny_activation_args
from transformers import AutoModel

from hf_dmsae import DMSAEModel
from hf_dmsae.attribution import AttributionArguments
from hf_dmsae.core import DMSAECore
from hf_dmsae.distillation import Distillation, DistillationArguments
from hf_dmsae.runs import SAEArguments
from hf_dmsae.trainer import DMSAETrainingArguments

REPO = Path(__file__).resolve().parents[1]


def distill_config(tmp_path, tiny_lm_dir, name: str, **overrides) -> Path:
    config = {
        "model_name_or_path": str(tiny_lm_dir), "hook_layer": 2, "context_length": 32, "lm_batch_size": 16,
        "num_tokens": 6000, "eval_tokens": 1000, "shuffle_buffer_tokens": 2048, "norm_tokens": 1024,
        "activation_cache": str(tmp_path / "cache"), "dict_size": 512, "k": 16, "num_cycles": 2,
        "attribution_tokens": 1500, "attribution_batch_size": 8, "tau": 0.8,
        "output_dir": str(tmp_path / name), "per_device_train_batch_size": 200, "max_steps": 90,
        "save_steps": 30, "logging_steps": 30, "learning_rate": 0.003, "seed": 0, "report_to": "none",
        "disable_tqdm": True,
    }  # fmt: skip
    config.update(overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def run_distill(config: Path, *extra: str, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "distill.py"), str(config), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, **popen)


def cores_of(folder: Path) -> list[DMSAECore]:
    state = json.loads((folder / "state.json").read_text())
    cores = [DMSAECore.from_pretrained(folder / state["cycles"][str(t)]["core"]) for t in range(3)]
    return cores + [DMSAECore.from_pretrained(folder / state["distilled"]["core"])]


@pytest.fixture(scope="module")
def straight_run(tiny_lm_dir, tmp_path_factory):
    """An uninterrupted 2-cycle distillation with the random-core control, pushed to the loopback Hub."""
    tmp_path = tmp_path_factory.mktemp("distill")
    config = distill_config(tmp_path, tiny_lm_dir, "straight", random_core_control=True, push_to_hub=True,
                            hub_token="hf_loopback", model_repo="org/tiny-dmsae")  # fmt: skip
    result = run_distill(config)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path, result


def test_distillation_reports_cores_and_a_distilled_intersection(straight_run):
    tmp_path, result = straight_run
    cores = cores_of(tmp_path / "straight")
    for core in cores[:3]:
        assert 0 < len(core) and core.coverage >= 0.8
    assert {i.split(":")[0] for i in cores[0].latent_ids} == {"cycle0"}
    distilled = cores[3]
    assert distilled.latent_ids == [i for i in cores[2].latent_ids if i in set(cores[1].latent_ids)]
    assert distilled.provenance["distilled"] is True
    report = (tmp_path / "straight" / "report.md").read_text()
    assert f"**{len(distilled)} latents**" in report and "held-out FVU" in report and "| random |" in report
    for name in ("coverage_curves", "carry_over", "l0_core"):
        figure = tmp_path / "straight" / "figures" / f"{name}.png"
        assert figure.read_bytes().startswith(b"\x89PNG") and f"figures/{name}.png" in report
    assert "Distilled core" in result.stdout


def test_frozen_rows_of_each_cycle_are_the_rows_selected_in_the_one_before(straight_run):
    tmp_path, _ = straight_run
    cores = cores_of(tmp_path / "straight")
    for t in (1, 2):
        model = DMSAEModel.from_pretrained(tmp_path / "straight" / f"cycle{t}")
        previous = cores[t - 1]
        assert model.config.core_ids == previous.latent_ids
        assert torch.equal(model.W_enc_frozen, previous.encoder_rows)
        assert model.config.latent_ids()[len(previous)] == f"cycle{t}:{len(previous)}"


def test_a_new_cycle_carries_over_the_core_rows_and_nothing_else(tiny_lm_dir, tmp_path):
    core = DMSAECore(
        encoder_rows=torch.randn(5, 32), latent_ids=[f"cycle0:{i}" for i in (3, 9, 1, 40, 7)],
        scores=torch.ones(5), pool_ids=[], pool_scores=torch.ones(0), coverage_curve=torch.ones(0),
    )  # fmt: skip
    run = Distillation(DistillationArguments(), SAEArguments(dict_size=256, k=8),
                       tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache")),
                       AttributionArguments(), DMSAETrainingArguments(output_dir=str(tmp_path / "run")))  # fmt: skip
    model = run._new_model(1, core, seed=0)
    assert torch.equal(model.W_enc_frozen, core.encoder_rows) and model.config.core_ids == core.latent_ids
    assert torch.equal(model.b_enc, torch.zeros(256)) and torch.equal(model.b_dec, torch.zeros(32))
    assert not torch.allclose(model.W_dec[:5], core.encoder_rows / core.encoder_rows.norm(dim=1, keepdim=True))
    torch.testing.assert_close(model.W_enc_trainable, model.W_dec[5:])  # fresh tied init of the rest
    assert model.config.norm_factor == run.data.norm_factor


def test_random_core_control_trains_both_cores_alike(straight_run):
    tmp_path, _ = straight_run
    control = json.loads((tmp_path / "straight" / "state.json").read_text())["control"]
    assert set(control) == {"distilled", "random"}
    for result in control.values():
        assert len(result["l0_core_curve"]) == 3 and "eval_fvu" in result["metrics"]


def test_cores_and_model_are_pushed_as_repos_that_reload(straight_run):
    tmp_path, _ = straight_run
    cores = cores_of(tmp_path / "straight")
    for t in range(3):
        assert DMSAECore.from_pretrained(f"org/tiny-dmsae-core-cycle{t}").latent_ids == cores[t].latent_ids
    distilled = DMSAECore.from_pretrained("org/tiny-dmsae-core-distilled")
    assert torch.equal(distilled.encoder_rows, cores[3].encoder_rows)
    model = AutoModel.from_pretrained("org/tiny-dmsae")
    local = DMSAEModel.from_pretrained(tmp_path / "straight" / "cycle2")
    assert torch.equal(model.W_dec, local.W_dec) and torch.equal(model.W_enc_frozen, local.W_enc_frozen)
    files = HUB.files("org/tiny-dmsae-core-distilled")
    assert {"README.md", "coverage_curves.png", "carry_over.png"} <= set(files)
    assert b"![coverage_curves.png](coverage_curves.png)" in files["README.md"]


def test_a_distillation_killed_during_a_cycle_finishes_with_the_same_cores(straight_run, tiny_lm_dir):
    tmp_path, _ = straight_run
    config = distill_config(tmp_path, tiny_lm_dir, "killed", random_core_control=True)
    command = [sys.executable, str(REPO / "scripts" / "distill.py"), str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mid_cycle = tmp_path / "killed" / "cycle1" / "checkpoint-30" / "trainer_state.json"
    deadline = time.time() + 600
    while not mid_cycle.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "report.md").exists()

    resumed = run_distill(config)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for straight, killed in zip(cores_of(tmp_path / "straight"), cores_of(tmp_path / "killed"), strict=True):
        assert killed.latent_ids == straight.latent_ids
        torch.testing.assert_close(killed.encoder_rows, straight.encoder_rows, rtol=1e-5, atol=1e-6)


def test_cycle_zero_from_a_dictionary_learning_checkpoint_seeds_cycle_one(tiny_lm_dir, tmp_path):
    from test_formats import write_dictionary_learning_checkpoint

    state = write_dictionary_learning_checkpoint(tmp_path / "trainer_0", d=32, n=128, k=8, group_sizes=(8, 24, 96))
    state.update(b_dec=torch.zeros(32), b_enc=torch.zeros(128))  # biases at the scale of the tiny LM's activations
    torch.save(state, tmp_path / "trainer_0" / "ae.pt")
    config = json.loads((tmp_path / "trainer_0" / "config.json").read_text())
    config["trainer"].update(layer=2, lm_name=str(tiny_lm_dir))
    (tmp_path / "trainer_0" / "config.json").write_text(json.dumps(config))
    run = Distillation(
        DistillationArguments(cycle0_checkpoint=str(tmp_path / "trainer_0")), SAEArguments(dict_size=256, k=8),
        tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache")),
        AttributionArguments(attribution_tokens=600, tau=0.8), DMSAETrainingArguments(output_dir=str(tmp_path / "run")),
    )  # fmt: skip
    core = run._cycle(0, None)
    assert 0 < len(core) <= 8 and all(i.startswith("cycle0:") for i in core.latent_ids)
    indices = [int(i.split(":")[1]) for i in core.latent_ids]
    assert torch.equal(core.encoder_rows, state["W_enc"].T[indices])
    assert core.provenance["norm_factor"] == 1.0  # the checkpoint reads raw activations

    model = run._new_model(1, core, seed=0)
    # The new model reads activations divided by the run's norm factor: its frozen rows are rescaled to match.
    x = torch.randn(4, 32) * 3
    torch.testing.assert_close(x / run.data.norm_factor @ model.W_enc_frozen.T, x @ core.encoder_rows.T)
