import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_activation_args
from safetensors.torch import load_file
from transformers import AutoModel

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.activations import ActivationCache, load_language_model
from hf_dmsae.evaluation import activation_metrics
from hf_dmsae.trainer import DMSAETrainer, DMSAETrainingArguments

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def caches(tiny_lm_dir, tmp_path_factory):
    args = tiny_activation_args(tiny_lm_dir)
    lm, tokenizer = load_language_model(args)
    root = tmp_path_factory.mktemp("acts")
    train = ActivationCache.build(root / "train", args, lm, tokenizer, "train", 6000)
    held_out = ActivationCache.build(root / "test", args, lm, tokenizer, "test", 1000)
    return train, held_out


def core_model(norm_factor: float) -> DMSAEModel:
    torch.manual_seed(0)
    config = DMSAEConfig(
        d_in=32, dict_size=256, core_size=16, k=8, core_ids=[f"cycle0:{i}" for i in range(16)],
        norm_factor=norm_factor, dead_tokens_threshold=2000, threshold_beta=0.9,
    )  # fmt: skip
    core_rows = torch.randn(16, 32)
    return DMSAEModel.from_core(config, core_rows / core_rows.norm(dim=1, keepdim=True), config.core_ids)


def training_args(tmp_path, **overrides) -> DMSAETrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "run"), max_steps=60, per_device_train_batch_size=200, per_device_eval_batch_size=500,
        learning_rate=3e-3, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True,
    )  # fmt: skip
    settings.update(overrides)
    return DMSAETrainingArguments(**settings)


def test_trainer_learns_with_a_frozen_core_under_bf16_and_weight_decay(caches, tmp_path):
    train, held_out = caches
    model = core_model(train.norm_factor)
    frozen = model.W_enc_frozen.clone()
    args = training_args(tmp_path, bf16=True, weight_decay=0.1, max_steps=120, logging_steps=20)
    trainer = DMSAETrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    trainer.train()

    assert torch.equal(model.W_enc_frozen.view(torch.int32), frozen.view(torch.int32))
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(256))
    logs = [entry for entry in trainer.state.log_history if "fvu" in entry]
    assert len(logs) == 6
    expected = {"loss", "fvu", "aux_loss", "l0", "l0_core", "l0_noncore", "dead_fraction", "threshold"}
    assert expected | {f"prefix_loss_{i}" for i in range(5)} <= set(logs[-1])
    assert logs[-1]["fvu"] < 0.5 * logs[0]["fvu"] and logs[-1]["fvu"] < 0.3
    assert logs[-1]["l0_noncore"] == pytest.approx(model.config.k_noncore)
    assert logs[-1]["dead_fraction"] < 0.2
    assert logs[-1]["threshold"] > 0

    # The inference threshold ends calibrated on the first training rows, not at its lagging EMA.
    assert float(model.threshold) != logs[-1]["threshold"]
    assert float(model.threshold) == copy.deepcopy(model).calibrate_threshold(train.sample(args.calibrate_threshold_rows))
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_fvu", "eval_l0_core", "eval_l0_noncore"} <= set(metrics)
    assert metrics["eval_fvu"] < 0.5


def test_eval_loop_logs_the_evaluate_metrics_every_eval_steps(caches, tmp_path):
    train, held_out = caches
    model = core_model(train.norm_factor)
    # No calibration at the end, so the model evaluated at step 40 is the one compared below.
    args = training_args(tmp_path, max_steps=40, eval_strategy="steps", eval_steps=20, calibrate_threshold_rows=0)
    trainer = DMSAETrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    trainer.train()

    evals = [entry for entry in trainer.state.log_history if "eval_fvu" in entry]
    assert [entry["step"] for entry in evals] == [20, 40]
    assert evals[1]["eval_fvu"] < evals[0]["eval_fvu"]
    direct = activation_metrics(model, [held_out.__getitems__(range(len(held_out)))])
    for name in ("fvu", "l0_core", "l0_noncore", "l0"):
        assert evals[1][f"eval_{name}"] == pytest.approx(direct[name], rel=1e-5), name


def test_decoder_bias_starts_at_the_median_of_the_first_rows(caches, tmp_path):
    train, _ = caches
    model = core_model(train.norm_factor)
    trainer = DMSAETrainer(model=model, args=training_args(tmp_path, max_steps=1, learning_rate=1e-12), train_dataset=train)
    trainer.train()
    rows = train.__getitems__(list(range(4096))) / train.norm_factor
    assert (model.b_dec - rows.mean(0)).norm() < 0.5 * rows.mean(0).norm()


def run_config(tmp_path, tiny_lm_dir, name: str) -> list[str]:
    """Command line of scripts/train.py on the tiny LM, long enough to be killed mid-way."""
    config = {
        "model_name_or_path": str(tiny_lm_dir), "hook_layer": 2, "context_length": 32, "lm_batch_size": 16,
        "num_tokens": 10000, "eval_tokens": 0, "shuffle_buffer_tokens": 2048, "norm_tokens": 1024,
        "activation_cache": str(tmp_path / "cache"), "dict_size": 2048, "k": 16,
        "output_dir": str(tmp_path / name), "per_device_train_batch_size": 500, "max_steps": 240,
        "save_steps": 40, "logging_steps": 40, "learning_rate": 0.002, "seed": 0, "report_to": "none",
    }  # fmt: skip
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return [sys.executable, str(REPO / "scripts" / "train.py"), str(path)]


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, tiny_lm_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(run_config(tmp_path, tiny_lm_dir, "straight"), check=True, env=env, capture_output=True, timeout=600)

    command = run_config(tmp_path, tiny_lm_dir, "killed")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "killed" / "checkpoint-80" / "trainer_state.json"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists(), "the run finished before it was killed"

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    killed = load_file(tmp_path / "killed" / "model.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(killed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_two_process_ddp_on_cpu_trains_and_saves_a_reloadable_model(tmp_path, tiny_lm_dir):
    command = run_config(tmp_path, tiny_lm_dir, "ddp")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *command[1:],
              "--max_steps", "30", "--save_steps", "1000"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training process 0 of 2" in result.stderr and "Training process 1 of 2" in result.stderr
    model = AutoModel.from_pretrained(tmp_path / "ddp")
    assert isinstance(model, DMSAEModel) and model.config.hook_layer == 2
    assert model.threshold > 0 and (model.tokens_since_fired < 30 * 1000).all()
