import json

import pytest
import torch
from conftest import tiny_activation_args

from hf_dmsae.activations import (
    ActivationCache,
    LayerActivations,
    StreamingActivations,
    activation_dataset,
    collate_activations,
    decoder_layers,
    harvest,
    load_language_model,
    shuffled,
    token_sequences,
)
from hf_dmsae.embedded import EMBEDDED_LM, wiki_summaries


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return load_language_model(tiny_activation_args(tiny_lm_dir))


@pytest.mark.parametrize("hook_name, offset", [("resid_post", 1), ("resid_pre", 0)])
def test_hooked_activations_equal_a_full_forward_and_skip_the_upper_blocks(tiny_lm, hook_name, offset):
    lm, _ = tiny_lm
    input_ids = torch.randint(0, lm.config.vocab_size, (3, 20))
    calls = []
    handle = decoder_layers(lm)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        acts = LayerActivations(lm, 2, hook_name)(input_ids)
        assert calls == [], "blocks above the hook ran"
        full = lm(input_ids, output_hidden_states=True).hidden_states[2 + offset]
    finally:
        handle.remove()
    assert torch.equal(acts, full)


def test_sequences_are_packed_to_the_context_length_with_bos_first(tiny_lm):
    _, tokenizer = tiny_lm
    texts = ["The cat sat on the mat."] * 30
    sequences = list(token_sequences(texts, tokenizer, 16, prepend_bos=True))
    assert sequences and all(len(s) == 16 and s[0] == tokenizer.bos_token_id for s in sequences)
    body = [t for s in sequences for t in s[1:]]
    one_doc = tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert body == (one_doc * 30)[: len(body)]


def test_harvest_drops_special_token_positions(tiny_lm, tiny_lm_dir):
    lm, tokenizer = tiny_lm
    args = tiny_activation_args(tiny_lm_dir)
    rows = torch.cat(list(harvest(args, lm, tokenizer, "train", 2000)))
    assert rows.shape == (2000, 32)
    texts = (r["text"] for r in wiki_summaries()["train"])
    first = torch.tensor([next(token_sequences(texts, tokenizer, 32, prepend_bos=True))])
    assert first[0, 0] == tokenizer.bos_token_id and not torch.isin(first[0, 1:], torch.tensor(tokenizer.all_special_ids)).any()
    # The first sequence contributes its 31 positions after the BOS, in order.
    torch.testing.assert_close(rows[:31], LayerActivations(lm, 2)(first)[0, 1:])


def test_shuffling_buffer_permutes_rows_deterministically():
    blocks = [torch.arange(i * 10, i * 10 + 10, dtype=torch.float32)[:, None] for i in range(20)]
    first = torch.cat(list(shuffled(blocks, 64, seed=3)))
    again = torch.cat(list(shuffled(blocks, 64, seed=3)))
    assert torch.equal(first, again)
    assert torch.equal(first.flatten().sort().values, torch.arange(200, dtype=torch.float32))
    assert not torch.equal(first.flatten(), torch.arange(200, dtype=torch.float32))


def test_cache_round_trip_and_batched_gather(tiny_lm, tiny_lm_dir, tmp_path):
    lm, tokenizer = tiny_lm
    args = tiny_activation_args(tiny_lm_dir)
    cache = ActivationCache.build(tmp_path / "cache", args, lm, tokenizer, "train", 3000)
    assert len(cache) == 3000 and cache.d_in == 32
    harvested = torch.cat(list(harvest(args, lm, tokenizer, "train", 3000)))
    rows = cache.__getitems__(list(range(3000)))
    torch.testing.assert_close(rows.double().sum(0), harvested.double().sum(0))  # same rows, shuffled
    assert cache.norm_factor == pytest.approx(float(harvested[:512].pow(2).sum(-1).mean().sqrt()), rel=1e-5)
    picked = [5, 2999, 0, 1234]
    assert torch.equal(cache.__getitems__(picked), torch.stack([cache[i]["activations"] for i in picked]))
    assert torch.equal(collate_activations(cache.__getitems__(picked))["activations"], cache.__getitems__(picked))
    reopened = ActivationCache.build(tmp_path / "cache", args, lm, tokenizer, "train", 3000)
    assert torch.equal(reopened.__getitems__(picked), cache.__getitems__(picked))


def test_cache_for_other_activations_is_refused(tiny_lm, tiny_lm_dir, tmp_path):
    lm, tokenizer = tiny_lm
    ActivationCache.build(tmp_path / "cache", tiny_activation_args(tiny_lm_dir), lm, tokenizer, "train", 1000)
    other_layer = tiny_activation_args(tiny_lm_dir, hook_layer=1)
    with pytest.raises(ValueError, match="hook_layer"):
        ActivationCache.build(tmp_path / "cache", other_layer, lm, tokenizer, "train", 1000)
    with pytest.raises(ValueError, match="num_tokens"):
        ActivationCache.build(tmp_path / "cache", tiny_activation_args(tiny_lm_dir), lm, tokenizer, "train", 999)


def test_a_half_written_cache_is_never_taken_for_a_whole_one(tiny_lm, tiny_lm_dir, tmp_path, monkeypatch):
    lm, tokenizer = tiny_lm
    args = tiny_activation_args(tiny_lm_dir)
    import hf_dmsae.activations as activations

    def crash_after_first_block(*a, **k):
        yield from list(harvest(*a, **k))[:1]
        raise KeyboardInterrupt("killed while harvesting")

    monkeypatch.setattr(activations, "harvest", crash_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        ActivationCache.build(tmp_path / "cache", args, lm, tokenizer, "train", 1000)
    monkeypatch.undo()
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError, match="not a finished activation cache"):
        ActivationCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "shard-00000.safetensors").write_bytes(b"partial")
    with pytest.raises(ValueError, match="not a finished activation cache"):
        ActivationCache.build(tmp_path / "cache", args, lm, tokenizer, "train", 1000)
    (tmp_path / "cache" / "shard-00000.safetensors").unlink()
    cache = ActivationCache.build(tmp_path / "cache", args, lm, tokenizer, "train", 1000)
    assert len(cache) == 1000
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["identity"]["num_tokens"] == 1000


def test_embedded_smollm2_is_a_real_language_model():
    args = tiny_activation_args("unused", model_name_or_path=EMBEDDED_LM, hook_layer=15)
    lm, tokenizer = load_language_model(args)
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576
    text = wiki_summaries()["test"][0]["text"]
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        out = lm(input_ids, labels=input_ids, output_hidden_states=True)
    assert out.loss < 4.0, "the converted weights do not model English"
    torch.testing.assert_close(LayerActivations(lm, 15)(input_ids), out.hidden_states[16], rtol=0, atol=0)


def test_streamed_activations_are_the_cached_ones_in_the_same_order(tiny_lm, tiny_lm_dir, tmp_path):
    lm, tokenizer = tiny_lm
    streamed_args = tiny_activation_args(tiny_lm_dir)
    stream = activation_dataset(streamed_args, lm, tokenizer, "train", 2500)
    assert isinstance(stream, StreamingActivations)
    cached_args = tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "cache"))
    cache = activation_dataset(cached_args, lm, tokenizer, "train", 2500)
    assert isinstance(cache, ActivationCache) and (tmp_path / "cache" / "train" / "cache.json").is_file()
    rows = torch.stack([item["activations"] for item in stream])
    assert torch.equal(rows, cache.__getitems__(list(range(2500))))
    assert stream.norm_factor == cache.norm_factor
    assert stream.sample(100).shape == (100, 32)
