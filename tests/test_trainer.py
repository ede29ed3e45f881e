import copy
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from conftest import core_of_rows, tiny_activation_args, tiny_run_data
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.evaluation.held_out import activation_metrics
from hf_dmsae.model import kernels
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.resampling import ENCODER_SCALE, resample_dead_latents
from hf_dmsae.run.state import RunState, arguments_identity, distilled_core_record, load_recorded_core
from hf_dmsae.run.trainer import DMSAETrainer, DMSAETrainingArguments, TrainingDivergedError
from hf_dmsae.run.training import last_complete_checkpoint
from hf_dmsae.utils.integrity import IntegrityError

aten = torch.ops.aten

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def caches(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("acts")
    args = tiny_activation_args(tiny_lm_dir, activation_cache=str(root / "cache"), num_tokens=6000)
    data = tiny_run_data(root / "run", args)
    train = data.training_data(data.training_slice("train"), data.training_args)
    train.norm_factor = data.norm_factor  # the run's, which the models below are built with
    return train, data.eval_dataset()


def core_model(norm_factor: float, **overrides) -> DMSAEModel:
    torch.manual_seed(0)
    config = DMSAEConfig(
        d_in=32,
        dict_size=256,
        core_size=16,
        k=8,
        core_ids=[f"cycle0:{i}" for i in range(16)],
        norm_factor=norm_factor,
        dead_tokens_threshold=2000,
        threshold_beta=0.9,
        **overrides,
    )
    core_rows = torch.randn(16, 32)
    return DMSAEModel.from_core(config, core_rows / core_rows.norm(dim=1, keepdim=True))


def training_args(tmp_path, **overrides) -> DMSAETrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=60,
        per_device_train_batch_size=200,
        per_device_eval_batch_size=500,
        learning_rate=3e-3,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return DMSAETrainingArguments(**settings)


def test_trainer_learns_with_a_frozen_core_under_bf16_and_weight_decay(caches, tmp_path, device):
    train, held_out = caches
    model = core_model(train.norm_factor)
    frozen = model.W_enc_frozen.clone().to(device)
    args = training_args(
        tmp_path, bf16=True, weight_decay=0.1, max_steps=120, logging_steps=20, use_cpu=device.type == "cpu"
    )
    trainer = DMSAETrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    trainer.train()

    assert torch.equal(model.W_enc_frozen.view(torch.int32), frozen.view(torch.int32))
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(256, device=device))
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
    rows = train.sample(args.calibrate_threshold_rows).to(device)
    assert float(model.threshold) == copy.deepcopy(model).calibrate_threshold(rows)
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
    direct = activation_metrics(model, held_out.batches(300))
    for name in ("fvu", "l0_core", "l0_noncore", "l0"):
        assert evals[1][f"eval_{name}"] == pytest.approx(direct[name], rel=1e-5), name


def test_jumprelu_core_thresholds_learn_at_their_own_rate(caches, tmp_path):
    """The core thresholds' logs are an Adam group of their own: at a learning rate of 1e-4 for the SAE they still
    rise by ~`core_threshold_learning_rate` a step under a strong penalty, while at the SAE's rate they stay put
    (Adam's step does not grow with the penalty's weight)."""
    train, _ = caches
    rises = {}
    for rate in (1e-4, 0.05):
        model = core_model(train.norm_factor, sparsity="jumprelu_core", core_sparsity_coef=1.0)
        start = model.core_log_threshold.detach().clone()
        args = training_args(tmp_path / str(rate), max_steps=30, learning_rate=1e-4, core_threshold_learning_rate=rate)
        trainer = DMSAETrainer(model=model, args=args, train_dataset=train)
        trainer.train()
        groups = trainer.optimizer.param_groups
        assert [len(g["params"]) for g in groups if any(p is model.core_log_threshold for p in g["params"])] == [1]
        assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
        rises[rate] = (model.core_log_threshold.detach() - start).median().item()
    assert rises[1e-4] < 30 * 1e-4 * 1.5
    assert rises[0.05] > 0.5  # 30 steps, warm-up and decay included: 0.76


def test_decoder_bias_starts_at_the_median_of_the_first_rows(caches, tmp_path):
    train, _ = caches
    model = core_model(train.norm_factor)
    trainer = DMSAETrainer(
        model=model, args=training_args(tmp_path, max_steps=1, learning_rate=1e-12), train_dataset=train
    )
    trainer.train()
    rows = train.__getitems__(list(range(4096))) / train.norm_factor
    assert (model.b_dec - rows.mean(0)).norm() < 0.5 * rows.mean(0).norm()


def test_the_decoder_bias_and_the_decoder_norm_can_be_left_free_or_fixed_for_ablations(caches, tmp_path):
    train, _ = caches
    model = core_model(train.norm_factor)
    args = training_args(tmp_path, max_steps=20, train_decoder_bias=False, unit_norm_decoder=False)
    DMSAETrainer(model=model, args=args, train_dataset=train).train()
    reference = core_model(train.norm_factor)
    reference.init_decoder_bias(train.sample(args.init_decoder_bias_rows))
    assert torch.equal(model.b_dec, reference.b_dec), "b_dec left its geometric-median start"
    assert (model.W_dec.norm(dim=1) - 1).abs().max() > 1e-3, "decoder rows kept unit norm without the constraint"
    assert not torch.equal(model.b_enc, reference.b_enc)


class SynchronisingCalls(TorchDispatchMode):
    """Records the ops that make a CUDA host wait for the device: reading a value back (`item`, `bool`, `int`),
    outputs sized by their values (`nonzero`, boolean-mask indexing, `bincount`, `unique`, `repeat_interleave`
    without `output_size`). On a CPU they cost nothing, but they run the same code a CUDA step runs."""

    SYNCING = {
        aten._local_scalar_dense,
        aten.nonzero,
        aten.masked_select,
        aten.bincount,
        aten.unique_consecutive,
        aten._unique2,
        aten.unique_dim,
        aten.equal,
        aten.is_nonzero,
    }
    INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        masked = packet in self.INDEXING and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        unsized = packet is aten.repeat_interleave and kwargs.get("output_size") is None
        if packet in self.SYNCING or masked or unsized:
            frames = [
                f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_stack() if "hf_dmsae" in f.filename
            ]
            self.calls.append(f"{func} at {frames}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("sparsity", ["dense_core", "sparse_core"])
def test_a_training_step_never_waits_for_the_device_outside_logging(caches, tmp_path, sparsity, monkeypatch, device):
    """Forward, backward, the decoder's projection and renormalisation, the dead counters, the threshold and the
    logged metrics of every step, with dead latents (AuxK live), as CUDA runs them (one-topk selection, the decoder's
    sums in one call). On CUDA, torch's own sync debug mode fails any step that waits for the device, too."""
    monkeypatch.setattr(kernels, "ONE_TOPK_DEVICES", {device.type})
    monkeypatch.setattr(kernels, "BLOCKED_DECODE_DEVICES", set())
    train, _ = caches
    model = core_model(train.norm_factor)
    model.config.sparsity = sparsity
    model.tokens_since_fired[100:140] = 10**9
    args = training_args(tmp_path, max_steps=6, logging_steps=3, use_cpu=device.type == "cpu")
    trainer = DMSAETrainer(model=model, args=args, train_dataset=train)
    assert not trainer.args.logging_nan_inf_filter, "the Trainer's own per-step loss check waits for the device"
    counter = SynchronisingCalls()
    step, renormalise = trainer.training_step, trainer.sae.normalize_decoder
    steps = []

    tolist = torch.Tensor.tolist

    def read_back(tensor):  # reads values back without an op the dispatch mode sees
        caller = traceback.extract_stack()[-2]
        counter.calls.append(f"tolist at {Path(caller.filename).name}:{caller.lineno}")
        return tolist(tensor)

    def counted(function):
        def run(*args, **kwargs):
            with counter, monkeypatch.context() as patch:
                patch.setattr(torch.Tensor, "tolist", read_back)
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    return function(*args, **kwargs)
                finally:
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("default")

        return run

    monkeypatch.setattr(trainer, "training_step", counted(lambda *a, **k: steps.append(1) or step(*a, **k)))
    monkeypatch.setattr(trainer.sae, "normalize_decoder", counted(renormalise))
    trainer.train()
    assert len(steps) == 6 and trainer.state.log_history[0]["aux_loss"] > 0, "AuxK ran on dead latents"
    assert counter.calls == []


def test_nan_inputs_end_training_at_the_next_log_with_a_clear_error(caches, tmp_path):
    train, _ = caches

    class Poisoned(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, index):
            row = train[index]
            return {"activations": torch.full_like(row["activations"], float("nan"))} if index % 7 == 0 else row

        def sample(self, n):
            return train.sample(n)

    model = core_model(train.norm_factor)
    trainer = DMSAETrainer(
        model=model, args=training_args(tmp_path, max_steps=6, logging_steps=3), train_dataset=Poisoned()
    )
    with pytest.raises(ValueError, match="activations contain NaN or inf values: .* rows"):
        trainer.train()


def run_config(tmp_path, tiny_lm_dir, name: str, **overrides) -> list[str]:
    """Command line of scripts/train.py on the tiny LM, long enough to be killed mid-way."""
    config = {
        "model_name_or_path": str(tiny_lm_dir),
        "hook_layer": 2,
        "context_length": 32,
        "lm_batch_size": 16,
        "num_tokens": 40000,
        "eval_tokens": 0,
        "shuffle_buffer_tokens": 2048,
        "norm_tokens": 1024,
        "activation_cache": str(tmp_path / "cache"),
        "dict_size": 2048,
        "k": 16,
        "output_dir": str(tmp_path / name),
        "per_device_train_batch_size": 500,
        "max_steps": 80,
        "save_steps": 20,
        "logging_steps": 20,
        "learning_rate": 0.002,
        "seed": 0,
        "report_to": "none",
    }
    config.update(overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return [sys.executable, str(REPO / "scripts" / "train.py"), str(path)]


def kill_after(command: list[str], marker: Path, env: dict) -> None:
    """Start `command` and SIGKILL it as soon as `marker` exists."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


KILLED_RUNS = {  # the settings of each run and the checkpoint after which it is killed
    "cached": ({}, 40),
    # Two passes of 40 steps over half the tokens, killed inside the second.
    "cached, 2 passes": ({"num_tokens": 20000, "num_train_epochs": 2, "max_steps": -1}, 60),
    # Dead latents resampled every 10 steps (from the step's batch), killed between two resamplings.
    "cached, resampling": ({"resample_dead_every": 10, "dead_tokens_threshold": 2000}, 40),
    # One pass over the budget (no max_steps), 20 steps of 500 rows, killed after step 8.
    "streamed": ({"activation_cache": None, "max_steps": -1, "save_steps": 4, "num_tokens": 10000}, 8),
}


@pytest.mark.parametrize("source", list(KILLED_RUNS))
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, tiny_lm_dir, source):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    overrides, step = KILLED_RUNS[source]
    subprocess.run(
        run_config(tmp_path, tiny_lm_dir, "straight", **overrides),
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    command = run_config(tmp_path, tiny_lm_dir, "killed", **overrides)
    kill_after(command, tmp_path / "killed" / f"checkpoint-{step}" / "checksums.json", env)
    assert not (tmp_path / "killed" / "model.safetensors").exists(), "the run finished before it was killed"

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    killed = load_file(tmp_path / "killed" / "model.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(killed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    states = [json.loads((tmp_path / name / "state.json").read_text()) for name in ("straight", "killed")]
    assert states[0]["slices"] == states[1]["slices"], "the resumed run read the same tokens"
    if overrides.get("resample_dead_every"):
        logs = json.loads((tmp_path / "killed" / "checkpoint-80" / "trainer_state.json").read_text())["log_history"]
        assert sum(entry.get("resampled_latents", 0) for entry in logs if entry["step"] > step) > 0
    # What it measured of its convergence before the kill came back with the checkpoint: the same measurements.
    curves = [state["convergence"]["curve"] for state in states]
    assert [p["step"] for p in curves[1]] == [p["step"] for p in curves[0]]
    for straight_point, killed_point in zip(*curves, strict=True):
        assert killed_point["train_fvu"] == pytest.approx(straight_point["train_fvu"], abs=1e-5)
        assert killed_point["share_near_init"] == pytest.approx(straight_point["share_near_init"], abs=1e-6)


def test_a_rerun_with_other_arguments_is_refused_naming_them(tmp_path, tiny_lm_dir):
    activations, sae = tiny_activation_args(tiny_lm_dir), SAEArguments(dict_size=256, k=8)
    first = training_args(tmp_path, learning_rate=0.002)
    state = RunState(tmp_path / "run", "train", arguments_identity(sae, activations, first), writer=True)
    state.close()
    again = RunState(tmp_path / "run", "train", arguments_identity(sae, activations, first), writer=True)
    again.close()
    other = training_args(tmp_path, learning_rate=0.01)
    with pytest.raises(ValueError, match="DMSAETrainingArguments.learning_rate: recorded 0.002, now 0.01"):
        RunState(tmp_path / "run", "train", arguments_identity(sae, activations, other), writer=True)
    with pytest.raises(ValueError, match="holds a train run, not a distillation run"):
        RunState(tmp_path / "run", "distillation", {}, writer=True)
    state_file = tmp_path / "run" / "state.json"
    whole = json.loads(state_file.read_text())
    state_file.write_text(state_file.read_text()[:40])  # truncated, as a full disk leaves it
    with pytest.raises(IntegrityError, match=r"run/state.json is damaged or truncated"):
        RunState(tmp_path / "run", "train", arguments_identity(sae, activations, first), writer=True)
    for damaged, problem in (
        ([whole], "holds a JSON list, not an object"),
        ({**whole, "slices": {}}, "'slices' is a JSON object, not a list"),
        ({k: v for k, v in whole.items() if k != "identity"}, "no 'identity'"),
        ({**whole, "metrics": {"fvu": "0.1"}}, "'metrics.fvu' is a JSON string, not a number"),
    ):
        state_file.write_text(json.dumps(damaged))
        with pytest.raises(
            IntegrityError, match=rf"run/state.json(:| has| holds) .*{problem}|run/state.json {problem}"
        ):
            RunState(tmp_path / "run", "train", arguments_identity(sae, activations, first), writer=True)


def test_a_distillation_state_with_a_damaged_record_or_a_core_outside_its_folder_is_refused(tmp_path):
    folder = tmp_path / "run"
    RunState(folder, "distillation", {"a": 1}, writer=True).close()
    whole = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**whole, "cycles": "oops"}))
    for read in (
        lambda: RunState(folder, "distillation", {"a": 1}, writer=True),
        lambda: distilled_core_record(folder),
    ):
        with pytest.raises(IntegrityError, match=r"run/state.json: 'cycles' is a JSON string, not an object; repair"):
            read()
    (folder / "state.json").write_text(json.dumps({**whole, "cycles": {"0": {"carried_over": "3"}}}))
    with pytest.raises(IntegrityError, match=r"'cycles.0.carried_over' is a JSON string, not a number"):
        RunState(folder, "distillation", {"a": 1}, writer=True)
    core = core_of_rows(torch.randn(2, 8))
    core.save_pretrained(tmp_path / "elsewhere")
    record = {"core": "../elsewhere", "core_digest": core.digest(), "size": 2, "last_cycle": 0}
    (folder / "state.json").write_text(json.dumps({**whole, "distilled": record}))
    with pytest.raises(IntegrityError, match=r"the recorded path '../elsewhere' leaves the run folder .*/run"):
        load_recorded_core(folder, distilled_core_record(folder))
    (folder / "state.json").write_text(json.dumps({**whole, "distilled": {"core": "distilled-core"}}))
    with pytest.raises(IntegrityError, match=r"run/state.json has no 'distilled.core_digest'"):
        distilled_core_record(folder)


def test_a_write_that_fails_during_a_checkpoint_names_the_folder_and_the_cause(tmp_path, tiny_lm_dir):
    """A file-size limit stands in for a full disk: the same failed write(2), without filling the machine's disk."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the failed write then returns EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    command = run_config(
        tmp_path, tiny_lm_dir, "full", activation_cache=None, max_steps=-1, save_steps=4, num_tokens=10000
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size)
    assert result.returncode != 0
    error = next((line for line in result.stderr.splitlines() if line.startswith("OSError: ")), result.stderr[-3000:])
    assert f"could not write {tmp_path / 'full' / 'checkpoint-4'}: " in error and "File too large" in error, error
    assert "MiB free on its disk" in error, "the disk's free space tells a full disk from another cause"


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(tmp_path, tiny_lm_dir, caches):
    train, _ = caches
    args = training_args(tmp_path, max_steps=20, save_strategy="steps", save_steps=5, save_total_limit=3)
    DMSAETrainer(model=core_model(train.norm_factor), args=args, train_dataset=train).train()
    run = tmp_path / "run"
    assert last_complete_checkpoint(run) == str(run / "checkpoint-20")
    weights = run / "checkpoint-20" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated, as a crash during a copy leaves it
    assert last_complete_checkpoint(run) == str(run / "checkpoint-15")
    (run / "checkpoint-15" / "checksums.json").unlink()  # a checkpoint killed before its checksums were written
    assert last_complete_checkpoint(run) == str(run / "checkpoint-10")


def test_resampling_restarts_dead_non_core_latents_along_residuals_and_their_adam_state(caches):
    train, _ = caches
    model = core_model(train.norm_factor)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    batch = train.__getitems__(list(range(200)))
    model(batch).loss.backward()
    optimizer.step()
    before = copy.deepcopy(model.state_dict())
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.state}
    dead = torch.tensor([3, 20, 100, 255])  # a core latent (3), then three others
    model.tokens_since_fired[dead] = model.config.dead_tokens_threshold

    resampled = resample_dead_latents(model, batch, optimizer, torch.Generator().manual_seed(0))

    assert resampled.tolist() == [20, 100, 255], "the core is never resampled"
    kept = torch.ones(256, dtype=torch.bool)
    kept[resampled] = False
    assert torch.equal(model.W_enc_frozen, before["W_enc_frozen"])
    for name in ("W_dec", "b_enc"):
        assert torch.equal(getattr(model, name)[kept], before[name][kept]), name
    assert torch.equal(model.W_enc_trainable[kept[16:]], before["W_enc_trainable"][kept[16:]])
    # Each new decoder row is the unit residual of one batch row; its encoder row the same at the alive rows' norm.
    reference = copy.deepcopy(model)
    reference.load_state_dict(before)
    residual = batch - reference.decode(reference.encode(batch, batch_topk=True))
    residual /= residual.norm(dim=1, keepdim=True)
    new_rows = model.W_dec[resampled]
    assert (new_rows @ residual.T).max(1).values.min() > 1 - 1e-5
    alive_norm = before["W_enc_trainable"][kept[16:]].norm(dim=1).mean()
    torch.testing.assert_close(model.W_enc_trainable[resampled - 16], ENCODER_SCALE * alive_norm * new_rows)
    assert model.b_enc[resampled].eq(0).all() and model.tokens_since_fired[resampled].eq(0).all()
    assert model.tokens_since_fired[3] == model.config.dead_tokens_threshold
    for parameter, index in (
        (model.W_dec, resampled),
        (model.b_enc, resampled),
        (model.W_enc_trainable, resampled - 16),
    ):
        state, old = optimizer.state[parameter], moments[id(parameter)]
        untouched = torch.ones(len(parameter), dtype=torch.bool)
        untouched[index] = False
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key][index].eq(0).all() and torch.equal(state[key][untouched], old[key][untouched])


@pytest.mark.parametrize("every", [0, 10])
def test_latents_that_can_never_fire_come_back_only_with_resampling(caches, tmp_path, every):
    train, _ = caches
    model = core_model(train.norm_factor)
    silenced = torch.arange(192, 256)
    with torch.no_grad():
        model.b_enc[silenced] = -1e3  # no row, hence no gradient and no AuxK, reaches them
    frozen = model.W_enc_frozen.clone()
    trainer = DMSAETrainer(model=model, args=training_args(tmp_path, resample_dead_every=every), train_dataset=train)
    trainer.train()

    alive = model.tokens_since_fired[silenced] < model.config.dead_tokens_threshold
    resampled = sum(entry.get("resampled_latents", 0) for entry in trainer.state.log_history)
    assert torch.equal(model.W_enc_frozen, frozen)
    if every:
        assert resampled >= len(silenced) and alive.float().mean() > 0.5
    else:
        assert resampled == 0 and not alive.any()


def test_a_diverging_run_stops_with_an_error(tmp_path, caches):
    train, _ = caches
    trainer = DMSAETrainer(
        model=core_model(1.0), args=training_args(tmp_path, learning_rate=1e12, max_steps=30), train_dataset=train
    )
    with pytest.raises(TrainingDivergedError, match="training diverged"):
        trainer.train()


@pytest.mark.parametrize(
    "overrides, rate, named",
    [
        # The penalty's gradient squared overflows fp32: Adam's second moment is inf and the thresholds never move.
        ({"core_sparsity_coef": 1e30}, 0.01, "the optimiser's exp_avg_sq of 'core_log_threshold'"),
        # The thresholds' own rate drives them to NaN: the core switches off and the loss stays finite.
        ({"core_sparsity_coef": 0.01}, 1e6, "parameter 'core_log_threshold'"),
    ],
)
def test_a_training_whose_parameters_or_their_optimiser_state_turn_non_finite_stops_naming_them(
    caches, tmp_path, overrides, rate, named
):
    train, _ = caches
    model = core_model(train.norm_factor, sparsity="jumprelu_core", **overrides)
    args = training_args(tmp_path, max_steps=30, core_threshold_learning_rate=rate)
    trainer = DMSAETrainer(model=model, args=args, train_dataset=train)
    with pytest.raises(TrainingDivergedError, match=rf"{named} holds \d+ NaN or infinite values by step 10: "):
        trainer.train()
    assert trainer.state.global_step == 10, "stopped at the first logging step"


def test_two_runs_on_one_output_dir_are_refused(tmp_path):
    holder = RunState(tmp_path / "run", "train", {"a": 1}, writer=True)
    script = f"""
from hf_dmsae.run.state import RunState
try:
    RunState({str(tmp_path / "run")!r}, "train", {{"a": 1}}, writer=True)
except RuntimeError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "is in use by another run" in result.stdout, result.stderr[-2000:]
    del holder
