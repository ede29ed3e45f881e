"""The feature browser, built by its CLI on a tiny LM and opened in a real headless Chromium."""

import json
import shutil
import subprocess

import pytest
import torch
from conftest import tiny_model, write_text_folder
from test_scripts import run_script

from hf_dmsae.model.core import DMSAECore
from hf_dmsae.model.modeling_dmsae import SparseLatents
from hf_dmsae.publishing.browser import FeatureStatistics, check_site_dir, context_windows, logit_effects


def test_feature_statistics_keep_the_top_contexts_over_batches():
    stats = FeatureStatistics(dict_size=3, top=2, width=3)
    input_ids = torch.arange(10).view(2, 5)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 0] = False  # a BOS, say: no row, but still a context token
    windows, rows = context_windows(input_ids, keep, before=1, after=1)
    assert windows[0].tolist() == [0, 1, 2] and rows[0].tolist() == [-1, 0, 1]
    assert windows[4].tolist() == [-1, 5, 6], "a context stops at the sequence's start"
    latents = torch.zeros(9, 3)
    latents[2, 0], latents[7, 0], latents[5, 1] = 3.0, 1.0, 2.0
    stats.update(SparseLatents.from_dense(latents), windows, rows)
    later = torch.zeros(9, 3)
    later[4, 0] = 2.0
    stats.update(SparseLatents.from_dense(later), windows, rows)
    assert stats.values[:, 0].tolist() == [3.0, 2.0] and stats.values[:, 1].tolist() == [2.0, 0.0]
    assert stats.tokens[0, 0].tolist() == [2, 3, 4] and stats.window_acts[0, 0].tolist() == [0.0, 3.0, 0.0]
    assert stats.fired.tolist() == [3, 1, 0] and stats.rows == 18 and stats.histogram.sum() == 4


def test_feature_statistics_saved_read_back_equal(tmp_path):
    stats = FeatureStatistics(dict_size=3, top=2, width=3)
    input_ids = torch.arange(10).view(2, 5)
    windows, rows = context_windows(input_ids, torch.ones(2, 5, dtype=torch.bool), before=1, after=1)
    stats.update(SparseLatents.from_dense(torch.rand(10, 3) * (torch.rand(10, 3) < 0.5)), windows, rows)
    stats.sequences = 2
    stats.save(tmp_path / "stats", {"model": "digest"})
    loaded, about = FeatureStatistics.load(tmp_path / "stats")
    assert about["model"] == "digest" and (loaded.rows, loaded.sequences, loaded.top, loaded.width) == (10, 2, 2, 3)
    for name in FeatureStatistics.TENSORS:
        assert torch.equal(getattr(loaded, name), getattr(stats, name)), name


def test_feature_statistics_from_sparse_entries_equal_a_dense_top_k_over_all_positions():
    """Random sparse latents in two batches against the plain computation over all positions at once: each latent's
    top values, their context tokens and the latent's activation at each context token."""
    generator = torch.Generator().manual_seed(0)
    n, top, width = 40, 3, 5
    input_ids = torch.randint(0, 100, (4, 25), generator=generator)
    keep = torch.rand(4, 25, generator=generator) > 0.2
    windows, rows = context_windows(input_ids, keep, before=2, after=2)
    positions = len(windows)
    shape = (2 * positions, n)
    dense = torch.rand(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.1)
    stats = FeatureStatistics(dict_size=n, top=top, width=width)
    for half in dense.split(positions):
        stats.update(SparseLatents.from_dense(half), windows, rows)
    values, picked = dense.topk(top, dim=0)
    assert torch.equal(stats.values, values)
    assert torch.equal(stats.fired, (dense > 0).sum(0))
    for k in range(top):
        for j in range(n):
            if values[k, j] == 0:
                continue
            row = int(picked[k, j])
            first = positions * (row // positions)
            assert torch.equal(stats.tokens[k, j], windows[row % positions])
            neighbours = rows[row % positions]
            expected = torch.where(neighbours >= 0, dense[first + neighbours.clamp_min(0), j], 0.0)
            assert torch.equal(stats.window_acts[k, j], expected)


def test_logit_effects_are_computed_for_the_paged_latents_only():
    sae = tiny_model()
    unembedding = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    effects = logit_effects(sae, unembedding, count=4, latents=[7, 2, 90], chunk=2, bins=5)
    promoted, suppressed = effects.promoted, effects.suppressed
    logits = sae.W_dec.detach() @ unembedding.T
    for j in (7, 2, 90):
        assert torch.equal(promoted[j], logits[j].topk(4).indices) and torch.equal(
            suppressed[j], (-logits[j]).topk(4).indices
        )
        torch.testing.assert_close(effects.suppressed_logits[j], -(-logits[j]).topk(4).values)
        assert effects.histogram[j].sum() == 50 and effects.histogram_centres[j][0] > logits[j].min()
    others = torch.ones(len(promoted), dtype=torch.bool)
    others[[7, 2, 90]] = False
    assert (promoted[others] == -1).all() and (suppressed[others] == -1).all()


def test_the_browser_site_loads_in_chromium_without_errors(tiny_lm_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the browser test needs Chromium (`make test` installs Debian's chromium package)"
    model = tiny_model(
        d_in=32,
        core_size=4,
        core_ids=[f"cycle1:{i}" for i in range(4)],
        base_model=str(tiny_lm_dir),
        hook_layer=2,
        hook_name="resid_post",
    )
    model.save_pretrained(tmp_path / "model")
    DMSAECore(
        encoder_rows=model.W_enc_frozen.clone(),
        latent_ids=model.config.core_ids,
        scores=torch.arange(4.0),
        pool_ids=[],
        pool_scores=torch.ones(0),
        coverage_curve=torch.ones(0),
        provenance={"cycle": 1},
    ).save_pretrained(tmp_path / "core")
    text = write_text_folder(tmp_path / "text", {"train": 60, "test": 30})
    (tmp_path / "site" / "latents").mkdir(parents=True)  # an earlier model's site, with more latents than this one
    (tmp_path / "site" / "index.html").write_text("<html>earlier</html>")
    (tmp_path / "site" / "latents" / "4000.html").write_text("<html>an earlier model's latent</html>")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("not a site")
    with pytest.raises(FileExistsError, match="holds files but no site"):  # what browse() checks first
        check_site_dir(tmp_path / "notes")
    browse = (
        "browse",
        "--model",
        tmp_path / "model",
        "--site_dir",
        tmp_path / "site",
        "--cores",
        tmp_path / "core",
        "--browse_tokens",
        600,
        "--dataset_name_or_path",
        text,
        "--context_length",
        32,
        "--norm_tokens",
        256,
        "--neuronpedia_dir",
        tmp_path / "neuronpedia",
    )
    result = run_script(*browse)  # the LM, layer and hook point from the model's config
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Statistics read back" not in result.stderr
    stats, about = FeatureStatistics.load(tmp_path / "site" / "statistics")
    assert stats.rows >= 600 and about["base_model"] == str(tiny_lm_dir) and about["hook_layer"] == 2
    again = run_script(*browse)
    assert again.returncode == 0 and "Statistics read back" in again.stderr, again.stderr[-3000:]
    assert torch.equal(FeatureStatistics.load(tmp_path / "site" / "statistics")[0].values, stats.values)
    batch = json.loads((tmp_path / "neuronpedia" / "batch-0.json").read_text())
    assert len(batch["features"]) == 128 and batch["layer"] == 2
    latents = json.loads((tmp_path / "site" / "latents.json").read_text())
    assert [latent["index"] for latent in latents[:4]] == [3, 2, 1, 0], "the core first, by attribution score"
    assert latents[0]["cycles"] == [1] and latents[0]["score"] == 3.0
    assert not (tmp_path / "site" / "latents" / "4000.html").exists(), "the earlier site was replaced as a whole"
    pages = {"index.html": "128 of 128 latents", f"latents/{latents[0]['index']}.html": "Top-activating contexts"}
    for page, expected in pages.items():
        opened = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--enable-logging=stderr",
                "--v=0",
                "--dump-dom",
                (tmp_path / "site" / page).as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        console = [line for line in opened.stderr.splitlines() if ":CONSOLE" in line]
        assert opened.returncode == 0 and not console, console or opened.stderr[-2000:]
        assert expected in opened.stdout, page  # the index's count is written by its script: the script ran


def test_the_neuronpedia_export_is_saedashboards_batch_format(tmp_path, tiny_lm_dir):
    """The export read back by SAEDashboard's own `NeuronpediaDashboardBatch` (0.8.0), which takes no field it does
    not know, gives the same JSON; every latent is in one batch, its top activations on the tokens the text had."""
    from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch
    from transformers import AutoTokenizer

    from hf_dmsae.publishing.neuronpedia import write_neuronpedia

    sae = tiny_model(d_in=32, base_model="org/Tiny-LM", hook_layer=2, hook_name="resid_post")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    stats = FeatureStatistics(dict_size=128, top=3, width=4)
    input_ids = torch.randint(10, 1000, (3, 20), generator=torch.Generator().manual_seed(0))
    windows, rows = context_windows(input_ids, torch.ones(3, 20, dtype=torch.bool), before=2, after=1)
    stats.update(sae.eval().encode_sparse(torch.randn(60, 32)), windows, rows)
    effects = logit_effects(sae, torch.randn(1000, 32), count=5, latents=list(range(128)), bins=10)
    read = {"dataset": "org/text", "n_prompts_total": 3, "n_tokens_in_prompt": 20}
    folder = write_neuronpedia(tmp_path / "np", sae, tokenizer, stats, effects, read, before=2, features_per_batch=50)
    batches = [json.loads((folder / f"batch-{i}.json").read_text()) for i in range(3)]
    assert (
        not (folder / "batch-3.json").exists()
        and json.loads((folder / "run_settings.json").read_text())["batches"] == 3
    )
    for batch in batches:
        assert NeuronpediaDashboardBatch(**batch).to_dict() == batch
    features = [feature for batch in batches for feature in batch["features"]]
    assert [f["feature_index"] for f in features] == list(range(128))
    assert batches[0]["model_id"] == "tiny-lm" and batches[0]["layer"] == 2
    fired = next(f for f in features if f["activations"])
    top = fired["activations"][0]
    assert top["values"][top["qualifying_token_index"]] == max(top["values"]) == top["bin_max"]
    assert len(top["tokens"]) == len(top["values"]) and fired["frac_nonzero"] > 0
    assert sum(fired["freq_hist_data_bar_heights"]) == round(fired["frac_nonzero"] * 60)
    assert len(fired["pos_str"]) == 5 and fired["pos_values"] == sorted(fired["pos_values"], reverse=True)
