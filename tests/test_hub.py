import pytest
import torch
from conftest import HUB, tiny_model
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModel

from hf_dmsae.core import DMSAECore
from hf_dmsae.formats import save_dictionary_learning
from hf_dmsae.hub import HubPushError, core_repo_name, publish, write_core_repo, write_model_repo

TOKEN = "hf_loopback"


def small_core() -> DMSAECore:
    torch.manual_seed(0)
    return DMSAECore(
        encoder_rows=torch.randn(3, 16), latent_ids=["cycle0:4", "cycle1:9", "cycle2:1"],
        scores=torch.tensor([3.0, 2.0, 1.0]), pool_ids=["cycle0:4", "cycle1:9", "cycle2:1", "cycle2:5"],
        pool_scores=torch.tensor([3.0, 2.0, 1.0, 0.5]), coverage_curve=torch.tensor([0.46, 0.77, 0.92, 1.0]),
        provenance={"cycle": 2, "base_model": "embedded:smollm2-135m", "q": 0.99, "tau": 0.9, "pool_size": 4,
                    "distilled": True},
    )  # fmt: skip


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
        with pytest.raises(HubPushError, match="(?s)507.*Nothing was committed and the new repo was deleted"):
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
        "org/dl-export", "trainer_0/ae.pt", "pythia-70m-deduped", torch.device("cpu"), torch.float32,
        local_dir=str(tmp_path / "downloaded"),
    )  # fmt: skip
    x = torch.randn(8, 16)
    torch.testing.assert_close(sae(x), model.decode(model.encode(x)))
