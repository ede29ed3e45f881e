import pytest
import torch
from conftest import HUB, tiny_model
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModel

from hf_dmsae.model.core import DMSAECore
from hf_dmsae.publishing.formats import save_dictionary_learning
from hf_dmsae.publishing.hub import (
    HubPushError,
    core_repo_name,
    publish,
    publish_all,
    resolve_folder,
    write_core_repo,
    write_model_repo,
)

TOKEN = "hf_loopback"


def small_core() -> DMSAECore:
    torch.manual_seed(0)
    return DMSAECore(
        encoder_rows=torch.randn(3, 16),
        latent_ids=["cycle0:4", "cycle1:9", "cycle2:1"],
        scores=torch.tensor([3.0, 2.0, 1.0]),
        pool_ids=["cycle0:4", "cycle1:9", "cycle2:1", "cycle2:5"],
        pool_scores=torch.tensor([3.0, 2.0, 1.0, 0.5]),
        coverage_curve=torch.tensor([0.46, 0.77, 0.92, 1.0]),
        provenance={
            "cycle": 2,
            "base_model": "embedded:smollm2-135m",
            "q": 0.99,
            "tau": 0.9,
            "pool_size": 4,
            "distilled": True,
        },
    )


def test_pushed_model_and_core_reload_identical_by_repo_name(tmp_path):
    model = tiny_model(base_model="embedded:smollm2-135m", hook_layer=15, hook_name="resid_post")
    model_repo = "org/dmsae-smollm2-l15"
    core_repo = core_repo_name(model_repo, cycle=None)
    assert core_repo == "org/dmsae-smollm2-l15-core-distilled"

    write_model_repo(model, tmp_path / "model", model_repo, metrics={"fvu": 0.2})
    write_core_repo(small_core(), tmp_path / "core", core_repo)
    assert publish(tmp_path / "model", model_repo, token=TOKEN) == f"{HUB.url}/{model_repo}"
    publish(tmp_path / "core", core_repo, token=TOKEN)

    reloaded = AutoModel.from_pretrained(model_repo)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    core = DMSAECore.from_pretrained(core_repo)
    assert core.latent_ids == small_core().latent_ids and torch.equal(core.encoder_rows, small_core().encoder_rows)

    card = ModelCard.load(model_repo)
    assert card.data.library_name == "hf_dmsae" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert f'AutoModel.from_pretrained("{model_repo}")' in card.text
    core_card = ModelCard.load(core_repo)
    assert "distilled core" in core_card.text and "dmsae" in core_card.data.tags


def test_a_server_error_mid_push_leaves_nothing_behind_and_says_so(tmp_path):
    write_core_repo(small_core(), tmp_path / "core", "org/failing-core")
    HUB.state.fail_commits, HUB.state.fail_status = 1, 507  # a server error the client does not retry
    try:
        with pytest.raises(HubPushError, match=r"(?s)507.*the new repos \['org/failing-core'\] were deleted"):
            publish(tmp_path / "core", "org/failing-core", token=TOKEN)
    finally:
        HUB.state.fail_commits, HUB.state.fail_status = 0, 500
    assert not HfApi().repo_exists("org/failing-core")
    assert (tmp_path / "core" / "core.safetensors").is_file()


def test_a_transient_server_error_is_retried(tmp_path):
    write_core_repo(small_core(), tmp_path / "core", "org/flaky-core")
    HUB.state.fail_commits = 1
    publish(tmp_path / "core", "org/flaky-core", token=TOKEN)
    assert "core.safetensors" in HUB.files("org/flaky-core")


def test_without_pushing_the_repo_is_the_local_folder(tmp_path):
    write_core_repo(small_core(), tmp_path / "core", "org/local-core")
    assert publish(tmp_path / "core", "org/local-core", push=False, token=TOKEN) == str(tmp_path / "core")
    assert not HfApi().repo_exists("org/local-core")
    assert DMSAECore.from_pretrained(tmp_path / "core").latent_ids == small_core().latent_ids


def test_saebench_loads_an_exported_model_from_the_hub(tmp_path):
    from sae_bench.custom_saes.batch_topk_sae import load_dictionary_learning_matryoshka_batch_topk_sae

    model = tiny_model(core_size=0, norm_factor=2.0, base_model="EleutherAI/pythia-70m-deduped", hook_layer=3)
    model.train()
    for _ in range(3):
        model(torch.randn(64, 16))
    model.eval()
    save_dictionary_learning(model, tmp_path / "export" / "trainer_0")
    publish(tmp_path / "export", "org/dl-export", token=TOKEN)
    sae = load_dictionary_learning_matryoshka_batch_topk_sae(
        "org/dl-export",
        "trainer_0/ae.pt",
        "pythia-70m-deduped",
        torch.device("cpu"),
        torch.float32,
        local_dir=str(tmp_path / "downloaded"),
    )
    x = torch.randn(8, 16)
    torch.testing.assert_close(sae(x), model.decode(model.encode(x)))


def test_a_connection_dropped_mid_commit_leaves_no_empty_repo(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)  # the client's backoff waits
    write_core_repo(small_core(), tmp_path / "core", "org/dropped-core")
    HUB.state.drop_commits = 100  # every try of the commit is hung up on
    try:
        with pytest.raises(HubPushError, match=r"(?s)Pushing .*core to org/dropped-core failed.*were deleted"):
            publish(tmp_path / "core", "org/dropped-core", token=TOKEN)
    finally:
        HUB.state.drop_commits = 0
    assert not HfApi().repo_exists("org/dropped-core")


def test_a_server_dying_mid_set_is_reported_with_what_could_not_be_removed(tmp_path):
    items = []
    for name in ("first", "second"):
        write_core_repo(small_core(), tmp_path / name, f"org/set-{name}")
        items.append((tmp_path / name, f"org/set-{name}"))
    HUB.state.dead_after_commits = HUB.state.commits + 1  # the first push lands, then the server is gone
    try:
        with pytest.raises(HubPushError) as failure:
            publish_all(items, token=TOKEN)
    finally:
        HUB.state.dead_after_commits = None
    message = str(failure.value)
    assert "Pushing" in message and "org/set-second failed" in message
    assert "could not be deleted" in message and "org/set-first" in message and str(tmp_path / "second") in message


def test_a_failure_later_in_a_set_removes_the_repos_created_before(tmp_path):
    items = []
    for name in ("one", "two"):
        write_core_repo(small_core(), tmp_path / name, f"org/pair-{name}")
        items.append((tmp_path / name, f"org/pair-{name}"))
    HUB.state.fail_commits, HUB.state.fail_status = 0, 507
    original = HUB.state.commits
    HUB.state.dead_after_commits = None

    class FailSecond(HfApi):
        def upload_folder(self, **kwargs):
            if kwargs["repo_id"] == "org/pair-two":
                HUB.state.fail_commits = 1
            return super().upload_folder(**kwargs)

    try:
        with pytest.raises(HubPushError, match=r"pair-one', 'org/pair-two'\] were deleted"):
            publish_all(items, token=TOKEN, api=FailSecond(token=TOKEN))
    finally:
        HUB.state.fail_commits, HUB.state.fail_status = 0, 500
    assert HUB.state.commits == original + 1
    assert not HfApi().repo_exists("org/pair-one") and not HfApi().repo_exists("org/pair-two")


def test_pushing_without_a_token_is_an_error_not_a_warning(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("hf_dmsae.publishing.hub.get_token", lambda: None)
    write_core_repo(small_core(), tmp_path / "core", "org/no-token")
    with pytest.raises(HubPushError, match="needs a Hugging Face token"):
        publish(tmp_path / "core", "org/no-token")


def test_folders_resolve_locally_or_from_a_hub_subfolder_at_a_revision(tmp_path):
    write_core_repo(small_core(), tmp_path / "release" / "layer_12" / "trainer_0", "org/release")
    publish(tmp_path / "release", "org/release", token=TOKEN)
    first = HfApi().model_info("org/release").sha
    (tmp_path / "release" / "layer_12" / "trainer_0" / "NOTE.md").write_text("second commit")
    publish(tmp_path / "release", "org/release", token=TOKEN)
    folder = resolve_folder("org/release/layer_12/trainer_0")
    assert (folder / "NOTE.md").is_file() and DMSAECore.from_pretrained(folder).latent_ids == small_core().latent_ids
    assert not (resolve_folder(f"org/release/layer_12/trainer_0@{first}") / "NOTE.md").exists()
    assert resolve_folder(str(tmp_path / "release")) == tmp_path / "release"
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        resolve_folder(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="has no folder 'layer_9'"):
        resolve_folder("org/release/layer_9")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a readable Hub repo"):
        resolve_folder("org/no-such-repo")


def test_a_core_with_inconsistent_tensors_is_refused():
    core = small_core()
    with pytest.raises(ValueError, match=r"one encoder row, id and score per latent: rows \(3, 16\), 3 ids, 2 scores"):
        DMSAECore(
            encoder_rows=core.encoder_rows,
            latent_ids=core.latent_ids,
            scores=core.scores[:2],
            pool_ids=core.pool_ids,
            pool_scores=core.pool_scores,
            coverage_curve=core.coverage_curve,
        )
    with pytest.raises(ValueError, match="one score and coverage value per id: 4 ids, 4 scores, 3 coverage"):
        DMSAECore(
            encoder_rows=core.encoder_rows,
            latent_ids=core.latent_ids,
            scores=core.scores,
            pool_ids=core.pool_ids,
            pool_scores=core.pool_scores,
            coverage_curve=core.coverage_curve[:3],
        )


def test_a_model_card_names_its_hook_and_data_and_its_snippet_runs(tmp_path, tiny_lm_dir):
    model = tiny_model(d_in=32, base_model=str(tiny_lm_dir), hook_layer=2, hook_name="resid_post")
    model.threshold.fill_(0.05)
    datasets = ["embedded:wiki-summaries", "monology/pile-uncopyrighted", str(tmp_path)]
    metrics = {
        "eval_fvu": 0.281234,
        "eval_l0_core": 12.3,
        "eval_runtime": 3.2,
        "eval_samples_per_second": 9.0,
        "epoch": 1.0,
    }
    write_model_repo(model, tmp_path / "model", "org/card-dmsae", datasets=datasets, metrics=metrics)
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["monology/pile-uncopyrighted"]
    assert card.data.metrics == ["fvu", "l0_core"] and "| fvu | 0.2812 |" in card.text and "runtime" not in card.text
    assert "output of `model.layers.2` (transformers) = `blocks.2.hook_resid_post`" in card.text
    assert "L0 = L0_core + L0_noncore" in card.text and "Wikipedia lead summaries" in card.text
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"fvu": 0.2812, "l0_core": 12.3} and card.data.model_name == "org/card-dmsae"
    # The usage snippet runs as written, against the pushed repo and the base model.
    publish(tmp_path / "model", "org/card-dmsae", token=TOKEN)
    snippet = card.text.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(snippet, namespace)
    record, ablated = namespace["record"], namespace["ablated"]
    assert record.latents.shape[1] == 128 and len(record.tokens[0]) == len(ablated.tokens)
    assert (
        "saelens" in card.data.tags and 'SAE.from_pretrained("org/card-dmsae", "blocks.2.hook_resid_post")' in card.text
    )


def test_ctrl_c_during_a_set_removes_the_repos_created_before_and_stays_an_interrupt(tmp_path):
    import signal

    items = []
    for name in ("one", "two"):
        write_core_repo(small_core(), tmp_path / name, f"org/interrupted-{name}")
        items.append((tmp_path / name, f"org/interrupted-{name}"))

    class InterruptedSecond(HfApi):
        def upload_folder(self, **kwargs):
            if kwargs["repo_id"] == "org/interrupted-two":
                signal.raise_signal(signal.SIGINT)  # Ctrl-C, delivered as the terminal delivers it
            return super().upload_folder(**kwargs)

    # Python's own Ctrl-C handler, as in a terminal (a process started in the background inherits SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            publish_all(items, token=TOKEN, api=InterruptedSecond(token=TOKEN))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not HfApi().repo_exists("org/interrupted-one") and not HfApi().repo_exists("org/interrupted-two")


@pytest.mark.parametrize("name", ["org/release/../../../etc", "org/release/./x", "org/../x"])
def test_a_hub_path_cannot_leave_its_repo(name):
    with pytest.raises(ValueError, match="cannot have '.' or '..'|is not a Hub repo name"):
        resolve_folder(name)


@pytest.mark.parametrize("name", ["..", "org/..", "org/a..b", "a/b/c", "org/-x"])
def test_repo_names_follow_the_hubs_rules_when_parsed(name):
    from hf_dmsae.method.distillation import DistillationArguments
    from hf_dmsae.method.transfer import TransferArguments

    with pytest.raises(ValueError, match=rf"model_repo={name!r} is not a Hub repo name"):
        DistillationArguments(model_repo=name)
    with pytest.raises(ValueError, match=rf"model_repo={name!r} is not a Hub repo name"):
        TransferArguments(core="org/core", model_repo=name)
