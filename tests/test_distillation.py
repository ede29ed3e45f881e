import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HUB, quiet_training_args, tiny_activation_args, token_positions
from transformers import AutoModel

from hf_dmsae import DMSAEModel
from hf_dmsae.data.activations import Harvester
from hf_dmsae.data.cache import ActivationCache
from hf_dmsae.data.language_model import load_language_model
from hf_dmsae.data.slices import SliceLayout
from hf_dmsae.method.attribution import AttributionArguments
from hf_dmsae.method.distillation import Distillation, DistillationArguments
from hf_dmsae.model.core import DMSAECore
from hf_dmsae.publishing.formats import load_cycle0
from hf_dmsae.publishing.hub import publish
from hf_dmsae.run.arguments import SAEArguments
from hf_dmsae.run.trainer import DMSAETrainingArguments

REPO = Path(__file__).resolve().parents[1]


DEMO_CONFIG = REPO / "configs" / "smollm2-135m.json"


def distill_config(tmp_path, tiny_lm_dir, name: str, **overrides) -> list[str]:
    """The demo config (`configs/smollm2-135m.json`) with stand-ins: the tiny LM, a small budget and width."""
    stand_ins = {
        "model_name_or_path": str(tiny_lm_dir),
        "hook_layer": 2,
        "context_length": 32,
        "lm_batch_size": 16,
        "num_tokens": 6000,
        "eval_tokens": 1000,
        "shuffle_buffer_tokens": 2048,
        "norm_tokens": 1024,
        "activation_cache": str(tmp_path / "cache"),
        "dict_size": 512,
        "k": 16,
        "attribution_tokens": 2000,
        "output_dir": str(tmp_path / name),
        "per_device_train_batch_size": 200,
        "save_steps": 10,
        "logging_steps": 10,
        "learning_rate": 0.003,
        "num_train_epochs": 2,  # the demo's passes, fewer
        "report_to": "none",
        "disable_tqdm": True,
        "track_selection_steps": 10,
    }
    stand_ins.update(overrides)
    return [str(DEMO_CONFIG)] + [item for key, value in stand_ins.items() for item in (f"--{key}", str(value))]


def run_distill(config: list[str], *extra: str, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "distill.py"), *config, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, **popen)


def cores_of(folder: Path) -> list[DMSAECore]:
    state = json.loads((folder / "state.json").read_text())
    cores = [DMSAECore.from_pretrained(folder / state["cycles"][str(t)]["core"]) for t in range(3)]
    return cores + [DMSAECore.from_pretrained(folder / state["distilled"]["core"])]


@pytest.fixture(scope="module")
def straight_run(tiny_lm_dir, tmp_path_factory):
    """The demo config with stand-ins, uninterrupted: 2 cycles, the controls and selection tracking, pushed to the
    loopback Hub."""
    tmp_path = tmp_path_factory.mktemp("distill")
    config = distill_config(
        tmp_path, tiny_lm_dir, "straight", push_to_hub=True, hub_token="hf_loopback", model_repo="org/tiny-dmsae"
    )
    result = run_distill(config)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path, result


def test_distillation_reports_cores_slices_and_a_distilled_intersection(straight_run):
    tmp_path, result = straight_run
    cores = cores_of(tmp_path / "straight")
    for core in cores[:3]:
        assert 0 < len(core) and core.coverage >= 0.8
    assert {i.split(":")[0] for i in cores[0].latent_ids} == {"cycle0"}
    distilled = cores[3]
    assert distilled.latent_ids == [i for i in cores[2].latent_ids if i in set(cores[1].latent_ids)]
    assert distilled.provenance["distilled"] is True
    report = (tmp_path / "straight" / "report.md").read_text()
    assert f"**{len(distilled)} latents**" in report and "held-out FVU" in report and "`k_noncore = 16`" in report
    for row in ("| attribution | train | 0 –", "| cycle1 | train |", "| control | train |", "| random_init | 1 |"):
        assert row in report
    for name in ("coverage_curves", "carry_over", "l0_core", "selection_convergence"):
        figure = tmp_path / "straight" / "figures" / f"{name}.png"
        assert figure.read_bytes().startswith(b"\x89PNG") and f"figures/{name}.png" in report
    assert "Distilled core" in result.stdout


def test_no_two_slices_share_a_token_position(straight_run, tiny_lm_dir):
    tmp_path, _ = straight_run
    state = json.loads((tmp_path / "straight" / "state.json").read_text())
    layout = SliceLayout(state["slices"])
    layout.check_disjoint()
    names = [piece.name for piece in layout if piece.split == "train"]
    assert names == ["attribution", "cycle0", "cycle1", "cycle2", "control"]
    # The rows each part actually read, located in the token stream by their content.
    lm, tokenizer = load_language_model(str(tiny_lm_dir))
    harvester = Harvester(tiny_activation_args(tiny_lm_dir, norm_tokens=1024), lm, tokenizer)
    searched = layout.get("control").end.sequence
    read = {}
    for piece in layout:
        if piece.split != "train":
            continue
        kind = "attribution" if piece.name == "attribution" else "activation"
        cache = next(p for p in (tmp_path / "cache").glob(f"{piece.name}-*") if p.is_dir())
        rows = ActivationCache(cache, verify=False).gather("activations", range(len(ActivationCache(cache))))
        read[piece.name] = token_positions(rows, harvester, "train", searched)
        first, end = piece.sequence_range
        assert all(first * 32 <= p < end * 32 for p in read[piece.name]), f"{kind} rows of {piece.name} stray"
    for a in read:
        for b in read:
            assert a == b or not read[a] & read[b], f"{a} and {b} share token positions"


def test_frozen_rows_of_each_cycle_are_the_rows_selected_in_the_one_before(straight_run):
    tmp_path, _ = straight_run
    cores = cores_of(tmp_path / "straight")
    for t in (1, 2):
        model = DMSAEModel.from_pretrained(tmp_path / "straight" / f"cycle{t}")
        previous = cores[t - 1]
        assert model.config.core_ids == previous.latent_ids
        assert torch.equal(model.W_enc_frozen, previous.encoder_rows)
        assert model.config.latent_ids()[len(previous)] == f"cycle{t}:{len(previous)}"
        assert model.config.k_noncore == 16, "k_noncore is the same fixed value in every cycle"


def test_a_new_cycle_carries_over_the_core_rows_and_nothing_else(tiny_lm_dir, tmp_path):
    core = DMSAECore(
        encoder_rows=torch.randn(5, 32),
        latent_ids=[f"cycle0:{i}" for i in (3, 9, 1, 40, 7)],
        scores=torch.ones(5),
        pool_ids=[],
        pool_scores=torch.ones(0),
        coverage_curve=torch.ones(0),
    )
    run = Distillation(
        DistillationArguments(),
        SAEArguments(dict_size=256, k=8),
        tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache")),
        AttributionArguments(),
        DMSAETrainingArguments(output_dir=str(tmp_path / "run")),
    )
    model = run._new_model(1, core, seed=0)
    assert torch.equal(model.W_enc_frozen, core.encoder_rows) and model.config.core_ids == core.latent_ids
    assert torch.equal(model.b_enc, torch.zeros(256)) and torch.equal(model.b_dec, torch.zeros(32))
    assert not torch.allclose(model.W_dec[:5], core.encoder_rows / core.encoder_rows.norm(dim=1, keepdim=True))
    torch.testing.assert_close(model.W_enc_trainable, model.W_dec[5:])  # fresh tied init of the rest
    assert model.config.norm_factor == run.data.norm_factor and model.config.k_noncore == 8


def test_the_controls_train_three_cores_per_seed_and_the_papers_is_random(straight_run):
    tmp_path, _ = straight_run
    folder = tmp_path / "straight"
    control = json.loads((folder / "state.json").read_text())["control"]
    assert set(control) == {f"{c}-seed{s}" for c in ("distilled", "random_init", "random_trained") for s in (0, 1)}
    for result in control.values():
        # two passes of 30 steps, logged every 10
        assert len(result["l0_core_curve"]) == 6 and "eval_fvu" in result["metrics"]
    distilled = cores_of(folder)[3]
    trained_rows = torch.cat([DMSAEModel.from_pretrained(folder / f"cycle{t}").W_enc for t in range(3)])
    trained_rows = trained_rows / trained_rows.norm(dim=1, keepdim=True)
    for seed in (0, 1):
        random_init = DMSAEModel.from_pretrained(folder / "control" / f"random_init-seed{seed}")
        rows = random_init.W_enc_frozen
        assert len(rows) == len(distilled) and random_init.config.core_ids[0] == "random:0"
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(rows)))
        assert (rows @ trained_rows.T).abs().max() < 0.95, "a random_init core row is a trained latent"
        random_trained = DMSAEModel.from_pretrained(folder / "control" / f"random_trained-seed{seed}")
        assert not set(random_trained.config.core_ids) & set(distilled.latent_ids)
        assert torch.equal(
            DMSAEModel.from_pretrained(folder / "control" / f"distilled-seed{seed}").W_enc_frozen,
            distilled.encoder_rows,
        )
    assert not list((folder / "control").glob("*/core")), "control models are not scored"


def test_the_core_dynamics_study_trains_the_controls_cores_on_one_lm_slice(straight_run, tiny_lm_dir):
    tmp_path, _ = straight_run
    folder = tmp_path / "straight"
    config = distill_config(tmp_path, tiny_lm_dir, "straight")
    attribution = {i for i, a in enumerate(config) if a in ("--attribution_tokens", "--track_selection_steps")}
    config = [a for i, a in enumerate(config) if i not in attribution and i - 1 not in attribution]
    command = [
        sys.executable,
        str(REPO / "scripts" / "core_dynamics.py"),
        *config,
        "--budgets",
        "1000",
        "2000",
        "--study_seeds",
        "0",
        "--ablations",
        "biases_frozen",
        "--ablation_budget",
        "1000",
        "--top_components",
        "4",
        "--geometry_rows",
        "512",
    ]
    result = subprocess.run(
        command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    study = folder / "core-dynamics" / "seed0"
    state = json.loads((study / "state.json").read_text())
    assert [(p["name"], p["start"]["sequence"], p["rows"]) for p in state["slices"] if p["split"] == "train"] == [
        ("core-dynamics", 0, 2000)
    ], "one slice of the largest budget, which every run reads"
    assert set(state["runs"]) == {
        f"paper/{c}-b{b}" for c in ("distilled", "random_init", "none") for b in (1000, 2000)
    } | {"biases_frozen/distilled-b1000", "biases_frozen/random_init-b1000"}
    assert state["runs"]["paper/distilled-b2000"]["steps"] == 2000 // 200
    for core in ("distilled", "random_init"):  # the rows of the distillation's control of the same seed
        control = DMSAEModel.from_pretrained(folder / "control" / f"{core}-seed0").W_enc_frozen
        assert torch.equal(DMSAEModel.from_pretrained(study / "paper" / f"{core}-b1000").W_enc_frozen, control)
    assert (
        "## Hypotheses and their ablations" in result.stdout and "| biases_frozen | random_init | 1 |" in result.stdout
    )


def test_the_scorer_study_scores_the_last_cycle_on_the_runs_attribution_split(straight_run, tiny_lm_dir):
    tmp_path, _ = straight_run
    config = distill_config(tmp_path, tiny_lm_dir, "straight")
    scorers = ["gxa", "ablation", "ablation:mean", "integrated_gradients"]
    extra = ["--study_source", "lm", "--results_dir", str(tmp_path / "scorers"), "--lm_tokens", "64", "--ig_steps", "2"]
    command = [sys.executable, str(REPO / "scripts" / "scorers.py"), *config, *extra, "--scorers", *scorers]
    result = subprocess.run(
        command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lm = json.loads((tmp_path / "scorers" / "results.json").read_text())["lm"]
    assert lm["model"].endswith("straight/cycle2") and set(lm["scorers"]) == {"gxa (whole split)", *scorers}
    whole, gxa = lm["scorers"]["gxa (whole split)"], lm["scorers"]["gxa"]
    assert whole["positions"] > 1500 and gxa["positions"] == lm["scorers"]["ablation"]["positions"] < 100
    assert len(gxa["scores"]) == lm["pool"] and lm["comparison"]["gxa"]["spearman vs gxa"] == pytest.approx(1.0)
    assert "| ablation:mean |" in result.stdout and "Spearman vs GxA (whole split)" in result.stdout


def test_selection_is_tracked_during_training(straight_run):
    tmp_path, _ = straight_run
    cycle = json.loads((tmp_path / "straight" / "state.json").read_text())["cycles"]["2"]
    # every 10 of 60 steps (two passes), not the last
    assert [t["step"] for t in cycle["track"]] == [10, 20, 30, 40, 50]
    assert all(0 <= t["selection_overlap_previous_core"] <= 1 for t in cycle["track"])
    logged = [e for e in cycle["log_history"] if "selection_size" in e]
    assert [e["selection_size"] for e in logged] == [t["selection_size"] for t in cycle["track"]]


def test_each_cycle_records_where_its_time_goes(straight_run):
    tmp_path, _ = straight_run
    state = json.loads((tmp_path / "straight" / "state.json").read_text())
    setup = state["setup"]["stages"]
    attribution_rows = setup["attribution pairs"]["tokens"]  # kept positions of the 2000-token split
    assert 1900 <= attribution_rows <= 2000 and setup["harvest"]["tokens"] > 0  # and the norm statistics' rows
    for t in ("1", "2"):
        cycle = state["cycles"][t]
        stages = cycle["stages"]
        assert set(stages) == {"harvest", "train", "attribution", "evaluation"}
        assert stages["harvest"]["tokens"] >= 6000  # the slice's rows, whole LM batches
        assert stages["train"]["tokens"] == cycle["steps"] * 200
        assert stages["attribution"]["tokens"] == (len(cycle["track"]) + 1) * attribution_rows  # tracked, then final
        assert stages["evaluation"]["tokens"] >= 1000
        assert all(s["seconds"] > 0 and s["tokens_per_s"] > 0 for s in stages.values())


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
    # Each card links the run's other repos: the model its cores, each core the model and the other cores.
    model_card = HUB.files("org/tiny-dmsae")["README.md"].decode()
    assert "[`org/tiny-dmsae-core-distilled`](https://huggingface.co/org/tiny-dmsae-core-distilled)" in model_card
    assert "- model of cycle 2: [`org/tiny-dmsae`]" in files["README.md"].decode()


def test_saelens_loads_the_pushed_model_from_its_hook_subfolder_with_the_same_latents(straight_run, tiny_lm_dir):
    from sae_lens import SAE

    tmp_path, _ = straight_run
    local = DMSAEModel.from_pretrained(tmp_path / "straight" / "cycle2").eval()
    sae = SAE.from_pretrained("org/tiny-dmsae", "blocks.2.hook_resid_post")
    metadata = sae.cfg.metadata
    assert (metadata.model_name, metadata.hook_name) == (str(tiny_lm_dir), "blocks.2.hook_resid_post")
    assert (metadata.context_size, metadata.prepend_bos, metadata.dataset_path) == (32, True, "embedded:wiki-summaries")
    cache = next(p for p in (tmp_path / "cache").glob("cycle2-*") if p.is_dir())
    rows = ActivationCache(cache, verify=False).gather("activations", range(300))
    with torch.no_grad():  # float32 both; the folded norm factor reorders the arithmetic
        torch.testing.assert_close(sae.encode(rows), local.encode(rows), rtol=1e-4, atol=1e-5)
    card = HUB.files("org/tiny-dmsae")["README.md"].decode()
    assert "saelens" in card and 'SAE.from_pretrained("org/tiny-dmsae", "blocks.2.hook_resid_post")' in card


def test_a_distillation_killed_during_a_cycle_finishes_with_the_same_cores(straight_run, tiny_lm_dir):
    tmp_path, _ = straight_run
    config = distill_config(tmp_path, tiny_lm_dir, "killed", random_core_control=False)  # the controls keep the cores
    command = [sys.executable, str(REPO / "scripts" / "distill.py"), *config]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mid_cycle = tmp_path / "killed" / "cycle1" / "checkpoint-10" / "checksums.json"
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
    slices = [json.loads((tmp_path / n / "state.json").read_text())["slices"] for n in ("straight", "killed")]
    assert slices[1] == [piece for piece in slices[0] if piece["name"] != "control"]

    # The finished run, resumed with another learning rate, is refused, naming the argument.
    other = run_distill(config, "--learning_rate", "0.01")
    assert other.returncode != 0 and "DMSAETrainingArguments.learning_rate: recorded 0.003, now 0.01" in other.stderr
    # A core damaged on disk is refused rather than carried into the next cycle.
    weights = tmp_path / "killed" / "cycle1" / "core" / "core.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    damaged = run_distill(config)
    assert damaged.returncode != 0 and "core.safetensors is damaged" in damaged.stderr


def test_cycle_zero_from_a_dictionary_learning_checkpoint_seeds_cycle_one(tiny_lm_dir, tmp_path):
    from test_formats import write_dictionary_learning_checkpoint

    state = write_dictionary_learning_checkpoint(tmp_path / "trainer_0", d=32, n=128, k=8, group_sizes=(8, 24, 96))
    state.update(b_dec=torch.zeros(32), b_enc=torch.zeros(128))  # biases at the scale of the tiny LM's activations
    torch.save(state, tmp_path / "trainer_0" / "ae.pt")
    config = json.loads((tmp_path / "trainer_0" / "config.json").read_text())
    config["trainer"].update(layer=2, lm_name=str(tiny_lm_dir))
    (tmp_path / "trainer_0" / "config.json").write_text(json.dumps(config))

    def distillation(**activation_overrides) -> Distillation:
        return Distillation(
            DistillationArguments(cycle0_checkpoint=str(tmp_path / "trainer_0")),
            SAEArguments(dict_size=256, k=8),
            tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), **activation_overrides),
            AttributionArguments(attribution_tokens=600, tau=0.8),
            DMSAETrainingArguments(output_dir=str(tmp_path / f"run{len(activation_overrides)}")),
        )

    run = distillation()
    _ = run.attribution
    core = run._cycle(0, None)
    assert 0 < len(core) <= 8 and all(i.startswith("cycle0:") for i in core.latent_ids)
    indices = [int(i.split(":")[1]) for i in core.latent_ids]
    assert torch.equal(core.encoder_rows, state["W_enc"].T[indices])
    assert core.provenance["norm_factor"] == 1.0  # the checkpoint reads raw activations
    # The rows move unchanged: a row is a gain along a unit decoder direction, in any activation units.
    assert torch.equal(run._new_model(1, core, seed=0).W_enc_frozen, core.encoder_rows)

    with pytest.raises(ValueError, match=r"trained for another model: layer 2 \(the run's hook_layer: 1\)"):
        other_layer = distillation(hook_layer=1)
        _ = other_layer.attribution
        other_layer._cycle(0, None)


def test_a_finished_run_republished_under_a_new_name_writes_cards_with_it(straight_run, tiny_lm_dir):
    from huggingface_hub import ModelCard

    tmp_path, _ = straight_run
    config = distill_config(
        tmp_path, tiny_lm_dir, "straight", push_to_hub=True, hub_token="hf_loopback", model_repo="org/renamed"
    )
    result = run_distill(config)
    assert result.returncode == 0, result.stderr[-3000:]
    for repo in ("org/renamed", "org/renamed-core-distilled", "org/renamed-core-cycle1"):
        card = ModelCard.load(repo).text
        assert repo in card and "org/tiny-dmsae" not in card, repo


def train_with_dictionary_learning(rows: torch.Tensor, folder: Path, normalize: bool, lm_name: str) -> Path:
    """A Matryoshka BatchTopK SAE trained and saved by dictionary_learning's own `trainSAE` (SAEBench's format)."""
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.training import trainSAE

    batches = list(rows.split(200))
    sizes = [16, 32, 64, 128, 272]
    trainer = {
        "trainer": MatryoshkaBatchTopKTrainer,
        "steps": len(batches),
        "activation_dim": rows.shape[1],
        "dict_size": 512,
        "k": 16,
        "layer": 2,
        "lm_name": lm_name,
        "group_fractions": [g / 512 for g in sizes],
        "lr": 3e-3,
        "warmup_steps": 5,
        "threshold_start_step": 5,
        "device": "cpu",
        "seed": 0,
    }
    trainSAE(
        batches, [trainer], steps=len(batches), save_dir=str(folder), normalize_activations=normalize, device="cpu"
    )
    return folder / "trainer_0"


def test_a_cycle_zero_trained_by_dictionary_learning_grows_a_next_cycle_like_our_own(tiny_lm_dir, tmp_path):
    """dictionary_learning stores its biases in raw units after training on normalised activations, or trains on raw
    ones: either way its encoder rows are gains along unit decoder directions and must seed a cycle as well as ours."""
    from conftest import tiny_run_data

    data = tiny_run_data(
        tmp_path / "rows",
        tiny_activation_args(tiny_lm_dir, num_tokens=12_000, activation_cache=str(tmp_path / "rows-cache")),
    )
    rows = data.training_data(data.training_slice("train"), data.training_args).gather("activations", range(12_000))
    cycle0 = {"own": None}
    for normalize in (True, False):
        cycle0[f"dictionary_learning normalize={normalize}"] = train_with_dictionary_learning(
            rows, tmp_path / f"dl-{normalize}", normalize, str(tiny_lm_dir)
        )
    fvu = {}
    for name, checkpoint in cycle0.items():
        run = Distillation(
            DistillationArguments(num_cycles=1, cycle0_checkpoint=str(checkpoint) if checkpoint else None),
            SAEArguments(dict_size=512, k=16),
            tiny_activation_args(tiny_lm_dir, num_tokens=12_000, activation_cache=str(tmp_path / "cache")),
            AttributionArguments(attribution_tokens=2000, tau=0.8),
            quiet_training_args(tmp_path / name.replace(" ", "-"), learning_rate=3e-3),
        )
        run.run()
        fvu[name] = run.state.record("cycles", "1")["metrics"]["eval_fvu"]
        run.state.close()
    print(fvu)
    for value in fvu.values():
        assert value < 1.25 * fvu["own"] + 0.05, fvu


def test_a_cycle_stops_once_its_tracked_selection_is_stable(tiny_lm_dir, tmp_path):
    run = Distillation(
        DistillationArguments(num_cycles=1),
        SAEArguments(dict_size=256, k=8),
        tiny_activation_args(tiny_lm_dir, num_tokens=6000, activation_cache=str(tmp_path / "cache")),
        AttributionArguments(
            attribution_tokens=1000,
            tau=0.8,
            track_selection_steps=5,
            stop_at_selection_overlap=0.05,
            selection_patience=2,
        ),
        quiet_training_args(tmp_path / "run"),
    )
    run.run()
    for t in ("0", "1"):
        cycle = run.state.record("cycles", t)
        jaccards = [entry["selection_jaccard_last"] for entry in cycle["track"][1:]]
        assert cycle["steps"] == 15 < 30 and all(j >= 0.05 for j in jaccards[:2]), cycle["track"]
        assert DMSAECore.from_pretrained(run.output_dir / cycle["core"]).provenance["stopped_at_step"] == 15
    run.state.close()


def test_a_sae_lens_sae_on_the_hub_seeds_cycle_zero_and_is_checked_against_the_run(tiny_lm_dir, tmp_path):
    from test_formats import write_sae_lens_sae

    # A release on the Hub: the SAE in a subfolder of a repo, read by its id as SAEBench's releases are.
    sae_folder = tmp_path / "release" / "blocks.2" / "width_128"
    write_sae_lens_sae(
        sae_folder, "jumprelu", d=32, n=128, model_name=str(tiny_lm_dir), hook_name="blocks.2.hook_resid_post"
    )
    publish(tmp_path / "release", "org/sae-lens-release", token="hf_loopback")

    def distillation(cycle0_k=8, **activation_overrides) -> Distillation:
        return Distillation(
            DistillationArguments(cycle0_checkpoint="org/sae-lens-release/blocks.2/width_128", cycle0_k=cycle0_k),
            SAEArguments(dict_size=256, k=8),
            tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"), **activation_overrides),
            AttributionArguments(attribution_tokens=600, tau=0.8),
            DMSAETrainingArguments(output_dir=str(tmp_path / f"run{len(activation_overrides)}")),
        )

    with pytest.raises(ValueError, match=r"trained for another model: layer 2 \(the run's hook_layer: 1\)"):
        distillation(hook_layer=1)
    run = distillation()
    _ = run.attribution
    core = run._cycle(0, None)
    cycle0 = load_cycle0(sae_folder, k=8)
    indices = [int(i.split(":")[1]) for i in core.latent_ids]
    assert 0 < len(core) and torch.equal(core.encoder_rows, cycle0.W_enc[indices].detach())
    assert run.state.data["identity"]["inputs.cycle0_checkpoint"]
    run.state.close()


def test_a_cycle_zero_checkpoint_is_checked_whole_before_anything_is_harvested(tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from test_formats import _poison, write_sae_lens_sae

    from hf_dmsae.utils.integrity import IntegrityError

    def distillation(folder, cycle0_k=None) -> Distillation:
        return Distillation(
            DistillationArguments(cycle0_checkpoint=str(folder), cycle0_k=cycle0_k),
            SAEArguments(dict_size=256, k=8),
            tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache")),
            AttributionArguments(attribution_tokens=600),
            DMSAETrainingArguments(output_dir=str(tmp_path / "run")),
        )

    write_sae_lens_sae(
        tmp_path / "no_k", "jumprelu", d=32, n=128, model_name=str(tiny_lm_dir), hook_name="blocks.2.hook_resid_post"
    )
    with pytest.raises(ValueError, match="records no k"):
        distillation(tmp_path / "no_k")
    write_sae_lens_sae(
        tmp_path / "nan", "topk", d=32, n=128, k=8, model_name=str(tiny_lm_dir), hook_name="blocks.2.hook_resid_post"
    )
    weights = tmp_path / "nan" / "sae_weights.safetensors"
    save_file({**load_file(weights), "W_enc": _poison(load_file(weights)["W_enc"])}, weights)
    with pytest.raises(IntegrityError, match="tensor 'W_enc' holds 1 NaN"):
        distillation(tmp_path / "nan")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists(), "nothing was harvested or begun"
