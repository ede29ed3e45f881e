"""A DMSAE on a live LM (`hf_dmsae.analysis`): capture, splice, intervene and steer on tiny random LMs of two
architectures (a Llama and a Gemma-2, whose last block's output is not `hidden_states[-1]`)."""

from pathlib import Path

import pytest
import torch

from hf_dmsae import DMSAEConfig, DMSAEModel
from hf_dmsae.analysis import capture, intervene, spliced, steer, text_token_ids
from hf_dmsae.data.activations import TrainingPositions
from hf_dmsae.data.language_model import LayerActivations, load_language_model
from hf_dmsae.evaluation.held_out import ce_loss_recovered

TEXT = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
ARCHITECTURES = ("tiny_lm_dir", "tiny_gemma2_dir")


@pytest.fixture(params=ARCHITECTURES)
def live(request):
    """`(lm directory, lm, tokenizer)` of each tiny architecture."""
    path = request.getfixturevalue(request.param)
    lm, tokenizer = load_language_model(str(path))
    return path, lm, tokenizer


def random_sae(path, lm, layer: int = 2, core_size: int = 0, seed: int = 0) -> DMSAEModel:
    """A random DMSAE for `lm` at block `layer`, its inference threshold calibrated on a text's activations."""
    torch.manual_seed(seed)
    width = lm.config.get_text_config().hidden_size
    config = DMSAEConfig(
        d_in=width,
        dict_size=64,
        k=8,
        core_size=core_size,
        core_ids=[f"cycle0:{i}" for i in range(core_size)] or None,
        base_model=str(path),
        hook_layer=layer,
        hook_name="resid_post",
    )
    sae = DMSAEModel.from_core(config, torch.randn(core_size, width)) if core_size else DMSAEModel(config)
    sae.eval()
    return sae


def calibrated(sae: DMSAEModel, lm, tokenizer) -> DMSAEModel:
    hidden = LayerActivations(lm, sae.config.hook_layer)(text_token_ids(tokenizer, TEXT))
    with torch.no_grad():
        sae.calibrate_threshold(hidden[0, 1:])
    return sae


def exact_sae(path, lm, layer: int = 2) -> DMSAEModel:
    """An SAE that reconstructs every activation exactly: latents `ReLU(x)` and `ReLU(−x)`, decoded by `±I`."""
    width = lm.config.get_text_config().hidden_size
    config = DMSAEConfig(
        d_in=width, dict_size=2 * width, k=width, base_model=str(path), hook_layer=layer, hook_name="resid_post"
    )
    sae = DMSAEModel(config)
    signs = torch.cat([torch.eye(width), -torch.eye(width)])
    with torch.no_grad():
        sae.W_enc_trainable.copy_(signs)
        sae.W_dec.copy_(signs)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.0)
    return sae.eval()


def hooks_left(lm) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.modules())


def test_spliced_with_the_error_term_or_an_exact_sae_gives_the_clean_logits(live):
    path, lm, tokenizer = live
    ids = text_token_ids(tokenizer, TEXT)
    clean = lm(input_ids=ids).logits
    last = lm.config.get_text_config().num_hidden_layers - 1  # where transformers applies the final norm after
    for layer in (1, last):
        with spliced(lm, calibrated(random_sae(path, lm, layer), lm, tokenizer), error_term=True):
            torch.testing.assert_close(lm(input_ids=ids).logits, clean, rtol=1e-5, atol=1e-5)
        with spliced(lm, exact_sae(path, lm, layer)):
            torch.testing.assert_close(lm(input_ids=ids).logits, clean, rtol=1e-5, atol=1e-5)
        with spliced(lm, calibrated(random_sae(path, lm, layer), lm, tokenizer)):  # a random SAE is no stand-in
            assert not torch.allclose(lm(input_ids=ids).logits, clean, atol=1e-3)
    assert hooks_left(lm) == 0


def test_hooks_and_the_sae_mode_are_restored_after_an_exception(live):
    path, lm, tokenizer = live
    sae = random_sae(path, lm).train()
    with pytest.raises(RuntimeError, match="inside"), spliced(lm, sae):
        assert not sae.training
        raise RuntimeError("inside")
    assert hooks_left(lm) == 0 and sae.training


def test_ablating_a_latent_that_never_fires_changes_nothing(live):
    path, lm, tokenizer = live
    sae = calibrated(random_sae(path, lm), lm, tokenizer)
    with torch.no_grad():
        sae.b_enc[5] = -1e6  # latent 5 can never fire
    record = capture(lm, tokenizer, sae, TEXT)
    assert not record.activations(5)[0].any() and record.activations(7)[0].count_nonzero() > 0
    for latents in (5, "cycle0:5"):
        (result,) = intervene(lm, tokenizer, sae, TEXT, latents)
        assert result.loss_change.abs().max() == 0 and result.kl.abs().max() < 1e-6
    (fired,) = intervene(lm, tokenizer, sae, TEXT, 7)  # one that fires does change the predictions
    assert fired.kl.max() > 1e-6


def test_ablating_the_whole_core_is_splicing_the_sae_without_it_as_ce_loss_recovered_measures(live):
    path, lm, tokenizer = live
    sae = calibrated(random_sae(path, lm, core_size=6), lm, tokenizer)
    without_core = calibrated(random_sae(path, lm, core_size=6), lm, tokenizer)
    with torch.no_grad():
        without_core.W_dec[:6] = 0.0  # the core's latents write nothing
    ids = text_token_ids(tokenizer, TEXT)
    positions = TrainingPositions(tokenizer, 0.0, None)
    measured = ce_loss_recovered(without_core, lm, [ids], positions)
    (ablated,) = intervene(lm, tokenizer, sae, TEXT, "core", error_term=False)
    assert float(ablated.loss_clean.mean()) == pytest.approx(measured["ce_loss_clean"], rel=1e-4)
    assert float(ablated.loss_edited.mean()) == pytest.approx(measured["ce_loss_spliced"], rel=1e-4)
    (kept,) = intervene(lm, tokenizer, sae, TEXT, "core")  # with the error term, only the core's part goes
    assert kept.kl.mean() > 0 and kept.promoted[0][1] > 0 > kept.suppressed[0][1]
    assert len(kept.promoted_at) == len(kept.suppressed_at) == len(kept.tokens) - 1


def test_steering_changes_greedy_generation_the_same_way_each_time_and_unhooks(live):
    path, lm, tokenizer = live
    sae = calibrated(random_sae(path, lm), lm, tokenizer)
    ids = text_token_ids(tokenizer, "The tower")
    plain = lm.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    plain = tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True)
    assert steer(lm, tokenizer, sae, "The tower", {3: 0.0}, max_new_tokens=12) == plain
    steered = steer(lm, tokenizer, sae, "The tower", {3: 200.0, "cycle0:9": -50.0}, max_new_tokens=12)
    assert steered != plain
    assert steer(lm, tokenizer, sae, "The tower", {3: 200.0, "cycle0:9": -50.0}, max_new_tokens=12) == steered
    assert hooks_left(lm) == 0


def test_capture_records_what_the_sae_encodes_and_ranks_a_latents_top_activations(tiny_lm_dir):
    lm, tokenizer = load_language_model(str(tiny_lm_dir))
    sae = calibrated(random_sae(tiny_lm_dir, lm), lm, tokenizer)
    texts = [TEXT, "A second, shorter text about towers."]
    record = capture(lm, tokenizer, sae, texts)
    ids = text_token_ids(tokenizer, texts[1])
    hidden = LayerActivations(lm, 2)(ids)[0]
    expected = sae.encode(hidden)
    assert torch.equal(record.token_ids[1], ids[0]) and record.tokens[1][0] == tokenizer.bos_token
    assert record.read.tolist() == [row not in record.text_starts for row in range(len(record.read))]  # BOS unread
    latent = int(expected[1:].sum(0).argmax())
    torch.testing.assert_close(record.activations(latent)[1], expected[:, latent], rtol=1e-5, atol=1e-6)
    error = (hidden - sae.decode(expected)).pow(2).sum(1)
    torch.testing.assert_close(record.squared_error[record.text_starts[1] :], error, rtol=1e-4, atol=1e-6)
    top = record.top(latent, n=3, context=2)
    values = [t.activation for t in top]
    assert values == sorted(values, reverse=True) and all(
        record.read[record.text_starts[t.text] + t.position] for t in top
    )
    assert f"[{top[0].token}]" in top[0].context and top[0].token == record.tokens[top[0].text][top[0].position]


def test_an_lm_of_another_width_or_name_is_refused_by_name(tiny_lm_dir, small_vocab_lm_dir, tiny_gemma2_dir):
    lm, tokenizer = load_language_model(str(tiny_lm_dir))
    sae = random_sae(small_vocab_lm_dir, lm)  # trained on another LM of the same width
    with pytest.raises(ValueError, match=r"it is '.*tiny-lm.*', the SAE was trained on '.*small-vocab-lm.*'"):
        capture(lm, tokenizer, sae, TEXT)
    wide = DMSAEConfig(d_in=48, dict_size=64, k=8, base_model=str(tiny_lm_dir), hook_layer=2, hook_name="resid_post")
    with pytest.raises(ValueError, match="its width is 32 .the SAE's d_in: 48."):
        intervene(lm, tokenizer, DMSAEModel(wide), TEXT, 0)
    gemma, _ = load_language_model(str(tiny_gemma2_dir))
    with pytest.raises(ValueError, match="the SAE was trained on"), spliced(gemma, random_sae(tiny_lm_dir, lm)):
        pass
    with pytest.raises(ValueError, match="latent id 'cycle9:1' is not one of this SAE's"):
        intervene(lm, tokenizer, random_sae(tiny_lm_dir, lm), TEXT, "cycle9:1")
    with pytest.raises(ValueError, match='latents="core": this SAE has no core'):
        intervene(lm, tokenizer, random_sae(tiny_lm_dir, lm), TEXT, "core")
    with pytest.raises(ValueError, match="mode='clamp' needs a value"):
        intervene(lm, tokenizer, random_sae(tiny_lm_dir, lm), TEXT, 0, mode="clamp")


def test_the_intervene_command_prints_a_table_of_every_position(tiny_lm_dir, tmp_path, capsys):
    from hf_dmsae.commands.intervene import main

    lm, tokenizer = load_language_model(str(tiny_lm_dir))
    calibrated(random_sae(tiny_lm_dir, lm, core_size=6), lm, tokenizer).save_pretrained(tmp_path / "sae")
    main(["--model", str(tmp_path / "sae"), "--text", TEXT, "--latents", "core", "--top", "3"])
    out = capsys.readouterr().out
    predicted = len(text_token_ids(tokenizer, TEXT)[0]) - 1
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == predicted + 1 and rows[0].startswith("| position | token")  # the header, a row per position
    assert "mean Δ loss" in out and out.count("promoted: ") == 1


def test_every_code_block_of_the_analysis_walkthrough_runs(tiny_lm_dir, tmp_path):
    """docs/analysis.md on a tiny LM: the demo's model path replaced by a tiny DMSAE with a core."""
    lm, tokenizer = load_language_model(str(tiny_lm_dir))
    calibrated(random_sae(tiny_lm_dir, lm, core_size=6), lm, tokenizer).save_pretrained(tmp_path / "sae")
    page = (Path(__file__).parents[1] / "docs" / "analysis.md").read_text()
    blocks = [block.split("```")[0] for block in page.split("```python\n")[1:]]
    assert len(blocks) == 5 and "runs/smollm2-135m-l15/cycle2" in blocks[0]
    namespace = {}
    for block in blocks:
        exec(block.replace("runs/smollm2-135m-l15/cycle2", str(tmp_path / "sae")), namespace)
    assert namespace["record"].latents.shape[1] == 64 and namespace["ablated"].kl.mean() > 0
