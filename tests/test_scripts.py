"""Every script and every shipped config, run as a user runs them (stand-ins where the real LM, data or scale are out
of reach), and every script's --help."""

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HUB, core_of_rows, write_text_folder
from transformers import AutoModel

from hf_dmsae import DMSAEModel
from hf_dmsae.data.slices import SliceLayout
from hf_dmsae.model.core import DMSAECore

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = (
    "train",
    "distill",
    "transfer",
    "synthetic",
    "worlds",
    "core_dynamics",
    "scorers",
    "study",
    "convergence",
    "browse",
    "intervene",
    "bench",
)
"""Every script but `paper_scale` (its --help is checked in-process by test_paper_scale)."""


def run_script(name: str, *args: str, launch: list[str] | None = None, timeout: int = 900):
    command = [sys.executable, *(launch or []), str(REPO / "scripts" / f"{name}.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def pile_stand_in(tmp_path_factory):
    """A local text dataset with the paper config's splits (`train`, `validation`), read with `streaming=True`."""
    return write_text_folder(tmp_path_factory.mktemp("pile") / "pile", {"train": 1500, "validation": 100})


def paper_config(tiny_gemma2_dir, dataset, output_dir, **overrides) -> list[str]:
    """`configs/gemma-2-2b-l12.json` as shipped, but for stand-ins: a tiny Gemma-2 in fp32 (bf16 matmuls are 15×
    slower on this CPU; training keeps the config's bf16), a local dataset, and a small budget and width."""
    stand_ins = {
        "model_name_or_path": tiny_gemma2_dir,
        "dataset_name_or_path": dataset,
        "lm_dtype": "float32",
        "num_tokens": 8192,
        "eval_tokens": 2048,
        "shuffle_buffer_tokens": 4096,
        "attribution_tokens": 8192,
        "dict_size": 1024,
        "num_cycles": 1,
        "calibrate_threshold_rows": 4096,
        "norm_tokens": 4096,
        "lm_batch_size": 4,
        "attribution_batch_size": 4,
        "output_dir": output_dir,
        **overrides,
    }
    return [str(REPO / "configs" / "gemma-2-2b-l12.json")] + [a for k, v in stand_ins.items() for a in (f"--{k}", v)]


def check_paper_run(folder: Path, cycles: int, steps: int) -> dict:
    state = json.loads((folder / "state.json").read_text())
    layout = SliceLayout(state["slices"])
    layout.check_disjoint()
    assert [p.name for p in layout] == ["eval", "attribution"] + [f"cycle{t}" for t in range(cycles + 1)]
    assert layout.get("eval").split == "validation" and layout.get("attribution").split == "train"
    for t in range(cycles + 1):
        assert state["cycles"][str(t)]["steps"] == steps, "the step count comes from the token budget"
        assert state["cycles"][str(t)]["k_noncore"] == 160
    cached = {p.name.split("-")[0] for p in (folder / "cache").iterdir() if p.is_dir()}
    assert cached == {"attribution"}, "streamed: only the attribution pairs are cached"
    distilled = DMSAECore.from_pretrained(folder / state["distilled"]["core"])
    assert 0 < len(distilled) == state["distilled"]["size"]
    model = DMSAEModel.from_pretrained(folder / f"cycle{cycles}")
    assert model.config.hook_layer == 12 and model.config.dict_size == 1024 and model.config.core_size > 0
    return state


def test_the_paper_config_runs_streamed_on_a_tiny_gemma2(tiny_gemma2_dir, pile_stand_in, tmp_path):
    config = paper_config(tiny_gemma2_dir, pile_stand_in, tmp_path / "run", push_to_hub="true", hub_token="hf_loopback")
    result = run_script("distill", *config)
    assert result.returncode == 0, result.stderr[-4000:]
    check_paper_run(tmp_path / "run", cycles=1, steps=2)
    assert "Training process 0 of 1 on cpu: 2 steps on slice 'cycle1'" in result.stderr
    assert AutoModel.from_pretrained("org/dmsae-gemma2-2b-l12").config.hook_layer == 12
    distilled = DMSAECore.from_pretrained("org/dmsae-gemma2-2b-l12-core-distilled")
    assert distilled.provenance["hook_layer"] == 12 and "README.md" in HUB.files("org/dmsae-gemma2-2b-l12-core-cycle1")


def test_the_paper_config_runs_streamed_with_two_processes(tiny_gemma2_dir, pile_stand_in, tmp_path):
    launch = [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    config = paper_config(tiny_gemma2_dir, pile_stand_in, tmp_path / "ddp")
    result = run_script("distill", *config, launch=launch)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        assert re.search(rf"Training process {rank} of 2 on cpu(:0)?: 1 steps on slice 'cycle1'", result.stderr)
    check_paper_run(tmp_path / "ddp", cycles=1, steps=1)


@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_the_accelerate_configs_launch_two_processes(config, tiny_lm_dir, tmp_path):
    launch = [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / f"{config}.yaml"),
        "--num_processes",
        "2",
    ]
    args = {
        "model_name_or_path": tiny_lm_dir,
        "hook_layer": 2,
        "context_length": 32,
        "num_tokens": 6000,
        "eval_tokens": 500,
        "shuffle_buffer_tokens": 1024,
        "norm_tokens": 512,
        "dict_size": 256,
        "k": 8,
        "per_device_train_batch_size": 200,
        "report_to": "none",
        "output_dir": tmp_path / config,
    }
    result = run_script("train", *[a for k, v in args.items() for a in (f"--{k}", v)], launch=launch)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        assert re.search(rf"Training process {rank} of 2 on cpu(:0)?: 15 steps on slice 'train'", result.stderr)
    assert '"fvu"' in result.stdout
    model = AutoModel.from_pretrained(tmp_path / config)
    assert isinstance(model, DMSAEModel) and model.config.dict_size == 256 and model.config.hook_layer == 2
    assert model.threshold > 0 and (model.tokens_since_fired <= 15 * 400).all()


def test_transfer_cli_runs_every_default_saebench_eval(small_vocab_lm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    core = core_of_rows(torch.randn(4, 32) / 4, cycle=2)
    core.save_pretrained(tmp_path / "core")
    args = {
        "core": tmp_path / "core",
        "ks": 8,
        "variants": "dense_core",
        "model_name_or_path": small_vocab_lm_dir,
        "hook_layer": 2,
        "context_length": 32,
        "num_tokens": 2000,
        "eval_tokens": 500,
        "norm_tokens": 512,
        "shuffle_buffer_tokens": 1024,
        "dict_size": 128,
        "per_device_train_batch_size": 200,
        "report_to": "none",
        "output_dir": tmp_path / "transfer",
        "ce_batches": 1,
        "core_batches": 1,
        "core_batch_prompts": 2,
        "core_variance_batches": 1,
        "meta_structure_steps": 5,
        "probe_datasets": "96_spam_is",
        "absorption_on_cpu": "true",
        "push_to_hub": "true",
        "hub_token": "hf_loopback",
        "model_repo": "org/transfer",
    }
    result = run_script("transfer", *[a for k, v in args.items() for a in (f"--{k}", v)])
    assert result.returncode == 0, result.stderr[-4000:]
    saebench = json.loads((tmp_path / "transfer" / "state.json").read_text())["results"]["k8-dense_core"]["saebench"]
    assert set(saebench) == {"core", "absorption", "sparse_probing_sae_probes", "meta_structure"}
    assert "metrics" in saebench["core"] and "metrics" in saebench["meta_structure"]
    assert "sae.sae_top_1_test_accuracy" in saebench["sparse_probing_sae_probes"]["metrics"]
    # A random LM with a small vocabulary has no first-letter features: SAEBench's gate declines, or its probes for
    # letters without words fail inside SAEBench; either way the dispatch reached SAEBench's own absorption code.
    absorption = saebench["absorption"]
    assert (
        "metrics" in absorption
        or "insufficent first-letter features" in absorption.get("skipped", "")
        or absorption.get("failed", "").startswith("SAEBench's absorption eval failed in absorption/")
    )
    assert "| 8 | dense_core |" in result.stdout
    pushed = AutoModel.from_pretrained("org/transfer-k8-dense_core")
    assert (
        pushed.config.core_ids == core.latent_ids
        and "## Held-out metrics" in HUB.files("org/transfer-k8-dense_core")["README.md"].decode()
    )


def test_synthetic_cli(tmp_path):
    # The shipped config at a tiny size: one seed, one cycle, one k.
    result = run_script(
        "synthetic",
        REPO / "configs" / "synthetic.json",
        "--num_features",
        64,
        "--hidden_dim",
        16,
        "--root_features",
        2,
        "--dict_size",
        64,
        "--k",
        4,
        "--transfer_ks",
        4,
        "--num_cycles",
        1,
        "--train_rows",
        2048,
        "--attribution_tokens",
        1024,
        "--eval_rows",
        1024,
        "--seeds",
        0,
        "--q",
        0.95,
        "--per_device_train_batch_size",
        256,
        "--output_dir",
        tmp_path / "synthetic",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| 4 | matryoshka |" in result.stdout and "| distilled |" in result.stdout


def test_worlds_cli(tmp_path):
    # The shipped family at a tiny size: one world of 32-48 features in 16 dimensions, two seeds, one cycle, one k.
    tiny = {"num_worlds": 1, "hidden_dim": 16, "features_per_dim_range": "2 3", "transfer_ks": 4, "matryoshka_ks": 8}
    tiny |= {"num_cycles": 1, "train_rows": 2048, "attribution_tokens": 1024, "eval_rows": 1024, "k": 4, "q": 0.95}
    tiny |= {"mcc_floor": 0.0, "per_device_train_batch_size": 256, "family_dir": tmp_path / "runs"}
    tiny |= {"results_dir": tmp_path / "worlds", "output_dir": tmp_path / "unused"}
    flags = [part for key, value in tiny.items() for part in (f"--{key}", *str(value).split())]
    result = run_script("worlds", REPO / "configs" / "worlds.json", *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "1 kept, 0 skipped" in result.stdout and "| world0 |" in result.stdout
    assert "| 4 | matryoshka |" in (tmp_path / "worlds" / "world0" / "report.md").read_text()


def undocumented_options(help_text: str) -> list[str]:
    """Options of an argparse `--help` text that have no help string."""
    lines, missing = help_text.splitlines(), []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not line.startswith("  --") or stripped.startswith("--help"):  # an option, not a help line's wrap
            continue
        option, _, rest = stripped.partition("  ")
        following = lines[index + 1].strip() if index + 1 < len(lines) else ""
        if not rest.strip() and (not following or following.startswith("-")):
            missing.append(option.split()[0])
    return missing


def test_every_option_of_every_script_is_documented(monkeypatch, capsys):
    """Each script run as `__main__` with --help, in this process (one set of imports for all)."""
    help_text = "  --a A  help\n  --b B\n  --c C\n       help of c\n  --d\n  --e E  help that wraps to\n       --a\n"
    assert undocumented_options(help_text) == ["--b", "--d"]
    monkeypatch.setenv("COLUMNS", "120")
    for script in SCRIPTS:
        monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "scripts" / f"{script}.py"), run_name="__main__")
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and out.count("\n  --") > 3, f"{script}.py --help: {out[-2000:]}"
        assert not undocumented_options(out), f"{script}.py options without help: {undocumented_options(out)}"


def test_the_commands_are_installed_as_console_scripts():
    """`pip install` users get the scripts as commands (`hf-dmsae-distill`, …); one of them runs."""
    commands = Path(sys.executable).parent
    assert all((commands / f"hf-dmsae-{name.replace('_', '-')}").is_file() for name in SCRIPTS if name != "bench")
    result = subprocess.run(
        [str(commands / "hf-dmsae-distill"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0 and "--cycle0_checkpoint" in result.stdout, result.stderr[-2000:]


def test_bench_times_every_implementation_attribution_and_the_stages_of_a_cycle(tmp_path):
    result = run_script(
        "bench",
        "--sizes",
        256,
        "--steps",
        1,
        "--out",
        tmp_path / "bench.json",
        "--cycle_tokens",
        2048,
        "--cycle_attribution_tokens",
        1024,
        "--cycle_eval_tokens",
        1024,
        "--lm_batch_shape",
        2,
        64,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["lm"]["tokens_per_batch"] == 128
    cycles = report["distillation_cycles"]  # the embedded default's distillation, on fewer tokens
    assert set(cycles["cycles"]) == {"0", "1"} and cycles["setup"]["attribution pairs"]["tokens"] >= 1024
    for stages in cycles["cycles"].values():
        assert {"harvest", "train", "attribution", "evaluation"} <= set(stages)
        assert all(s["tokens_per_s"] > 0 for s in stages.values())
    assert "cycle 1: " in result.stdout and "train" in result.stdout
    timed = {row["name"] for row in report["training_steps"] if "median_s" in row}
    assert {
        "limit (encoder matmul + ReLU)",
        "dmsae, dense core 2% (sparse kernels)",
        "dmsae, dense core 2% (sparse kernels, bf16 autocast)",
        "sae_lens MatryoshkaBatchTopKTrainingSAE",
        "dictionary_learning MatryoshkaBatchTopKTrainer",
    } <= timed
    lm = report["lm"]
    assert lm["attribution_cached_tok_per_s"] > 0 and lm["attribution_live_tok_per_s"] > 0
    assert "tok/s from cached (x, g) pairs" in result.stdout


def test_bench_times_the_steps_alone_at_a_chosen_shape(tmp_path):
    result = run_script(
        "bench",
        "--parts",
        "steps",
        "--sizes",
        256,
        "--steps",
        1,
        "--d_in",
        64,
        "--batch",
        512,
        "--k",
        8,
        "--out",
        tmp_path / "bench.json",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report) == {"machine", "setup", "training_steps"} and report["machine"]["device"] == "cpu"
    assert {key: report["setup"][key] for key in ("d_in", "batch", "k")} == {"d_in": 64, "batch": 512, "k": 8}
    ours = next(row for row in report["training_steps"] if row["name"] == "dmsae, dense core 2% (sparse kernels)")
    assert ours["tokens_per_s"] == pytest.approx(512 / ours["median_s"]) and ours["peak_memory_rise_mb"] >= 0


@pytest.mark.parametrize(
    "script, flags, refused",
    [
        ("transfer", ["--sparsity", "jumprelu_core"], "--sparsity jumprelu_core: not read here, each of --variants"),
        (
            "transfer",
            ["--core_sparsity_coef", "5", "--variants", "dense_core", "matryoshka"],
            "--core_sparsity_coef 5.0: not read here, no variant of --variants dense_core matryoshka reads it",
        ),
        ("study", ["--sparsity", "penalized_core"], "--sparsity penalized_core: not read here, each of --variants"),
        ("train", ["--sparsity", "jumprelu_core"], "--sparsity jumprelu_core: not read here, .* without a core"),
        ("train", ["--jumprelu_bandwidth", "0.1"], "--jumprelu_bandwidth 0.1: not read here"),
    ],
)
def test_a_setting_a_script_does_not_read_is_refused_before_it_runs(script, flags, refused, monkeypatch, tmp_path):
    """Never silently ignored, nor recorded in the run's identity (where the same command at the default is then
    refused)."""
    output = ["--core", str(tmp_path / "core")] if script == "transfer" else []
    output += ["--study_dir" if script == "study" else "--output_dir", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *flags, *output])
    with pytest.raises(ValueError, match=refused):
        runpy.run_path(str(REPO / "scripts" / f"{script}.py"), run_name="__main__")
    assert not (tmp_path / "run").exists()


STUDY_TARGETS = ("study", "claims", "synthetic", "synthetic-sparse-core", "variants", "variants-lm", "thresholds-lm")
STUDY_TARGETS += ("worlds", "dynamics", "scorers", "convergence")
STUDIES = {"study": "PaperClaims", "synthetic": "SyntheticBenchmark", "core_dynamics": "CoreDynamics"}
STUDIES |= {"scorers": "ScorerStudy", "worlds": "WorldFamily", "convergence": "ConvergenceSweep"}


class Parsed(Exception):
    """Raised by a study class stubbed out: its command parsed and checked its arguments."""


def make_commands(*targets: str) -> list[list[str]]:
    """The `scripts/<study>.py` command lines `make -n` prints for `targets`, a shell loop's at its first value."""
    printed = subprocess.run(["make", "-s", "-n", *targets], cwd=REPO, capture_output=True, text=True, check=True)
    commands = []
    for line in printed.stdout.replace("\\\n", " ").splitlines():
        loop = re.match(r"for (\w+) in (\S+) .*?; do (.*?)(\|\| exit 1)?; done", line)
        command = loop[3].replace(f"${loop[1]}", loop[2]) if loop else line
        words = command.split()
        script = next((w for w in words if re.fullmatch(r"scripts/\w+\.py", w)), None)
        if script and Path(script).stem in STUDIES:
            commands.append([arg.strip("\"'") for arg in words[words.index(script) :]])
    return commands


def test_every_study_command_of_the_makefile_parses_with_its_shipped_config(monkeypatch):
    """Each report's target runs for hours: its flags and config are checked here, up to building the study."""
    commands = make_commands(*STUDY_TARGETS)
    assert len(commands) == 20
    for script, *argv in commands:
        module = __import__(f"hf_dmsae.commands.{Path(script).stem}", fromlist=["main"])
        monkeypatch.setattr(module, STUDIES[Path(script).stem], lambda *args: (_ for _ in ()).throw(Parsed()))
        monkeypatch.setattr(sys, "argv", [script, *argv])
        with pytest.raises(Parsed):
            module.main()
