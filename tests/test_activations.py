import json

import pytest
import torch
from conftest import tiny_activation_args, tiny_run_data, token_positions, write_text_folder

from hf_dmsae.data import language_model
from hf_dmsae.data.activations import (
    ActivationArguments,
    ActivationStream,
    Harvester,
    collate_activations,
    shuffled_windows,
)
from hf_dmsae.data.cache import ActivationCache
from hf_dmsae.data.embedded import EMBEDDED_LM, wiki_summaries
from hf_dmsae.data.language_model import LayerActivations, decoder_layers, load_language_model
from hf_dmsae.data.text import StreamPosition, TextSource, TokenPacking, position_after
from hf_dmsae.utils.integrity import IntegrityError


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return load_language_model(str(tiny_lm_dir))


@pytest.fixture(scope="module")
def harvester(tiny_lm, tiny_lm_dir):
    lm, tokenizer = tiny_lm
    return Harvester(tiny_activation_args(tiny_lm_dir), lm, tokenizer)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lm_dir", ["tiny_lm_dir", "tiny_gemma2_dir"])
def test_pairs_and_patched_loss_from_the_chunked_head_equal_the_whole_logits(lm_dir, dtype, request, monkeypatch):
    """The chunked, checkpointed loss against the LM's own forward with its whole `[B, T, vocab]` logits, Gemma-2's
    soft-capping included (made strong, so that leaving it out would show). In float64 the two agree to 1e-10: the
    same arithmetic; in float32 within its rounding (the head's matmul blocks differently by chunk)."""
    lm, _ = load_language_model(str(request.getfixturevalue(lm_dir)))
    lm.to(dtype)
    if getattr(lm.config, "final_logit_softcapping", None):
        lm.config.final_logit_softcapping = 0.5
    vocab = lm.config.vocab_size
    monkeypatch.setattr(language_model, "LOSS_CHUNK_VALUES", 7 * vocab)  # 7 positions a chunk: 9 chunks, one short
    input_ids = torch.randint(0, vocab, (2, 31))
    layer = LayerActivations(lm, 1)
    leaf = layer(input_ids).detach().requires_grad_(True)
    handle = layer._hook(lambda hidden: leaf)
    try:
        with torch.enable_grad():
            logits = lm(input_ids=input_ids, use_cache=False).logits
            each = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none"
            )
            whole = each.sum()
            (expected,) = torch.autograd.grad(whole, leaf)
    finally:
        handle.remove()
    acts, gradient = layer.with_gradient(input_ids)
    loss = layer.patched_loss(input_ids, lambda hidden: hidden)
    assert torch.equal(acts, leaf.detach())
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert float((gradient - expected).norm() / expected.norm()) < tolerance
    assert abs(float(loss) - float(whole.detach())) < tolerance * abs(float(whole.detach()))
    per_position = layer.patched_loss(input_ids, lambda hidden: hidden, per_position=True)
    assert per_position.shape == (2, 31) and not per_position[:, -1].any()
    torch.testing.assert_close(per_position[:, :-1].flatten(), each.detach(), rtol=tolerance, atol=0)
    # At a moved point: the activations and gradient there, not the clean ones.
    shifted, shifted_gradient = layer.with_gradient(input_ids, transform=lambda hidden: hidden * 0.5)
    torch.testing.assert_close(shifted, acts * 0.5, rtol=0, atol=0)
    assert float((shifted_gradient - gradient).norm() / gradient.norm()) > 1e-3


def test_sequences_are_packed_to_the_context_length_with_bos_first(tiny_lm):
    _, tokenizer = tiny_lm
    texts = ["The cat sat on the mat."] * 30
    sequences = [ids for ids, _ in TokenPacking(tokenizer, 16).sequences(texts)]
    assert sequences and all(len(s) == 16 and s[0] == tokenizer.bos_token_id for s in sequences)
    body = [t for s in sequences for t in s[1:]]
    one_doc = tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert body == (one_doc * 30)[: len(body)]


def test_a_stream_started_at_a_recorded_position_continues_it_exactly(tiny_lm):
    _, tokenizer = tiny_lm
    source, packing = TextSource("embedded:wiki-summaries"), TokenPacking(tokenizer, 24)
    whole = list(packing.sequences(source.documents("train")))[:300]
    for cut in (0, 1, 17, 150, 299):
        position = whole[cut][1] if cut else StreamPosition()
        start = cut + 1 if cut else 0
        resumed = packing.sequences(source.documents("train", position.document), position)
        assert [next(resumed) for _ in range(len(whole) - start)] == whole[start:], cut
    assert position_after(source, "train", packing, StreamPosition(), 150) == whole[149][1]
    with pytest.raises(ValueError, match="sequences short"):
        position_after(source, "train", packing, StreamPosition(), 10**7)


def test_harvest_drops_special_token_and_outlier_positions(harvester, tiny_lm):
    lm, tokenizer = tiny_lm
    first = next(harvester.batches("train", StreamPosition()))
    input_ids = torch.tensor(
        [ids for ids, _ in TokenPacking(tokenizer, 32).sequences(r["text"] for r in wiki_summaries()["train"])][:16]
    )
    hidden = LayerActivations(lm, 2)(input_ids)
    keep = ~torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    keep &= hidden.norm(dim=-1) <= 10.0 * harvester.statistics.median_norm
    assert first.index == 0 and first.start == StreamPosition()
    torch.testing.assert_close(first.tensors["activations"], hidden[keep])
    assert torch.equal(first.tensors["positions"], torch.arange(16 * 32).view(16, 32)[keep])
    assert len(first) < 16 * 31, "special-token positions are dropped"


def test_statistics_do_not_depend_on_the_lm_batch_size(tiny_lm, tiny_lm_dir):
    lm, tokenizer = tiny_lm
    small, large = (
        Harvester(tiny_activation_args(tiny_lm_dir, lm_batch_size=b), lm, tokenizer).statistics for b in (3, 16)
    )
    assert small.median_norm == pytest.approx(large.median_norm, rel=1e-5)
    assert small.norm_factor == pytest.approx(large.norm_factor, rel=1e-5)


def test_shuffling_windows_permute_within_each_window_deterministically(harvester):
    batches = list(harvester.batches("train", StreamPosition(), max_sequences=80))
    windows = list(shuffled_windows(iter(batches), 1000, seed=3))
    again = list(shuffled_windows(iter(batches), 1000, seed=3))
    assert all(
        torch.equal(a.tensors["activations"], b.tensors["activations"]) for a, b in zip(windows, again, strict=True)
    )
    rows = torch.cat([b.tensors["activations"] for b in batches])
    shuffled = torch.cat([w.tensors["activations"] for w in windows])
    assert shuffled.shape == rows.shape and not torch.equal(shuffled, rows)
    torch.testing.assert_close(shuffled.double().sum(0), rows.double().sum(0))
    assert all(len(w) >= 1000 for w in windows[:-1]) and windows[1].rows_before == len(windows[0])
    assert windows[1].start == batches[windows[1].first_batch].start


def test_cache_round_trip_refusal_and_damage(harvester, tmp_path):
    blocks = (w.tensors for w in shuffled_windows(harvester.batches("train", StreamPosition()), 1000, 0))
    cache = ActivationCache.build(tmp_path / "cache", {"slice": 1}, blocks, 3000, "float32", extra=lambda: {"x": 1})
    assert len(cache) == 3000 and cache.d_in == 32 and cache.extra == {"x": 1}
    picked = [5, 2999, 0, 1234]
    assert torch.equal(cache.__getitems__(picked), torch.stack([cache[i]["activations"] for i in picked]))
    assert torch.equal(collate_activations(cache.__getitems__(picked))["activations"], cache.__getitems__(picked))
    assert torch.equal(ActivationCache(tmp_path / "cache").sample(7), cache.__getitems__(range(7)))
    with pytest.raises(ValueError, match=r"other rows.*'slice': \(1, 2\)"):
        ActivationCache.build(tmp_path / "cache", {"slice": 2}, iter([]), 3000, "float32")

    shard = tmp_path / "cache" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # one flipped bit in the last row
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="shard-00000.safetensors is damaged"):
        ActivationCache(tmp_path / "cache")
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(IntegrityError, match="shard-00000.safetensors is truncated"):
        ActivationCache(tmp_path / "cache")


def test_a_half_written_cache_is_never_taken_for_a_whole_one(harvester, tmp_path):
    def crash_after_first_block():
        yield next(harvester.batches("train", StreamPosition())).tensors
        raise KeyboardInterrupt("killed while harvesting")

    with pytest.raises(KeyboardInterrupt):
        ActivationCache.build(tmp_path / "cache", {}, crash_after_first_block(), 1000, "float32")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError, match="not a finished cache"):
        ActivationCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "shard-00000.safetensors").write_bytes(b"partial")
    with pytest.raises(ValueError, match="not a finished cache"):
        ActivationCache.build(tmp_path / "cache", {}, iter([]), 1000, "float32")
    (tmp_path / "cache" / "shard-00000.safetensors").unlink()
    blocks = (h.tensors for h in harvester.batches("train", StreamPosition()))
    assert len(ActivationCache.build(tmp_path / "cache", {}, blocks, 1000, "float32")) == 1000


def test_embedded_smollm2_is_a_real_language_model():
    lm, tokenizer = load_language_model(EMBEDDED_LM, hook_layer=15)
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576
    text = wiki_summaries()["test"][0]["text"]
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        out = lm(input_ids, labels=input_ids, output_hidden_states=True)
    assert out.loss < 4.0, "the converted weights do not model English"
    torch.testing.assert_close(LayerActivations(lm, 15)(input_ids), out.hidden_states[16], rtol=0, atol=0)


def test_streamed_rows_are_the_cached_ones_in_the_same_order(tiny_lm_dir, tmp_path):
    streamed = tiny_run_data(tmp_path / "streamed", tiny_activation_args(tiny_lm_dir))
    cached = tiny_run_data(tmp_path / "cached", tiny_activation_args(tiny_lm_dir, activation_cache=str(tmp_path / "c")))
    for data in (streamed, cached):
        data.training_args.max_steps = 20
    stream = streamed.training_data(streamed.training_slice("train"), streamed.training_args)
    cache = cached.training_data(cached.training_slice("train"), cached.training_args)
    assert isinstance(stream, ActivationStream) and isinstance(cache, ActivationCache)
    rows = torch.cat([batch["activations"] for batch in stream])
    assert rows.shape == (20 * 200, 32) and len(cache) == 4000
    assert torch.equal(rows, cache.__getitems__(range(4000)))
    assert (
        streamed.finish_slice(streamed.training_slice("train"), stream).end
        == cached.finish_slice(cached.training_slice("train"), cache).end
    )
    first = next(streamed.harvester.batches("train", stream.start)).tensors["activations"]
    assert torch.equal(stream.sample(100), first[:100])  # b_dec's median and the threshold read the slice's start


def test_a_resumed_stream_serves_exactly_the_rows_after_the_ones_consumed(tiny_lm_dir, tmp_path):
    data = tiny_run_data(tmp_path / "run", tiny_activation_args(tiny_lm_dir))
    data.training_args.max_steps = 30
    piece = data.training_slice("train")
    whole = [b["activations"] for b in data.training_data(piece, data.training_args)]
    for consumed in (7, 11, 29):
        first = data.training_data(piece, data.training_args)
        iterator = iter(first)
        for _ in range(consumed):
            next(iterator)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
        resumed = data.training_data(piece, data.training_args)
        resumed.resume(state, consumed)
        rest = [b["activations"] for b in resumed]
        assert len(rest) == 30 - consumed
        assert all(torch.equal(a, b) for a, b in zip(rest, whole[consumed:], strict=True)), consumed


def test_text_sources_of_every_kind_and_their_errors(tmp_path):
    folder = write_text_folder(tmp_path / "folder", {"train": 20, "validation": 5})
    assert TextSource(str(folder)).splits() == ["train", "validation"]
    streamed = TextSource(str(folder), streaming=True)
    assert list(streamed.documents("validation", start=3)) == list(TextSource(str(folder)).documents("validation"))[3:]
    single = TextSource(str(folder / "train.jsonl"))
    assert single.splits() == ["train"] and len(list(single.documents("train"))) == 20
    with pytest.raises(ValueError, match="has no split 'test'"):
        single.load("test")
    with pytest.raises(ValueError, match=r"text_column='body' is not a column .* \['text'\]"):
        next(TextSource(str(folder), column="body").documents("train"))
    with pytest.raises(FileNotFoundError, match="no such local folder or data file"):
        TextSource(str(tmp_path / "missing" / "data.jsonl")).splits()


def test_held_out_text_is_never_the_training_text(tiny_lm_dir, tmp_path):
    with pytest.raises(ValueError, match="eval_split='train' is the training split"):
        ActivationArguments(eval_split="train")
    folder = write_text_folder(tmp_path / "one-split", {"train": 300})
    data = tiny_run_data(tmp_path / "run", tiny_activation_args(tiny_lm_dir, dataset_name_or_path=str(folder)))
    held_out = data.eval_slice
    assert held_out.split == "train" and held_out.name == "eval"
    training = data.training_slice("train")
    assert training.start.sequence == held_out.end.sequence > 0, "training starts after the held-out slice"
    data.training_args.max_steps = 10
    stream = data.training_data(training, data.training_args)
    train_rows = torch.cat([b["activations"] for b in stream])
    searched = data.finish_slice(training, stream).end.sequence
    held_out_positions = token_positions(torch.cat(list(data.eval_batches(256))), data.harvester, "train", searched)
    assert held_out_positions and max(held_out_positions) < held_out.end.sequence * 32
    assert not held_out_positions & token_positions(train_rows, data.harvester, "train", searched)


def test_bad_activation_arguments_fail_before_any_work(tiny_lm_dir):
    with pytest.raises(ValueError, match="context_length=4096 is invalid: .* has 2048 positions"):
        load_language_model(str(tiny_lm_dir), context_length=4096)
    with pytest.raises(ValueError, match="hook_layer=9 is invalid"):
        load_language_model(str(tiny_lm_dir), hook_layer=9)
    with pytest.raises(ValueError, match="num_tokens=0 is invalid"):
        ActivationArguments(num_tokens=0)


@pytest.mark.parametrize("cached", [False, True], ids=["streamed", "cached"])
def test_max_steps_beyond_the_token_budget_is_refused_before_the_run_begins(tiny_lm_dir, tmp_path, cached):
    from hf_dmsae.method.attribution import AttributionArguments
    from hf_dmsae.method.distillation import Distillation, DistillationArguments
    from hf_dmsae.run.arguments import SAEArguments
    from hf_dmsae.run.trainer import DMSAETrainingArguments

    args = tiny_activation_args(tiny_lm_dir, num_tokens=2000, activation_cache=str(tmp_path / "c") if cached else None)

    def distillation(max_steps: int) -> Distillation:
        training = DMSAETrainingArguments(
            output_dir=str(tmp_path / "run"), per_device_train_batch_size=200, max_steps=max_steps
        )
        return Distillation(
            DistillationArguments(), SAEArguments(dict_size=64, k=4), args, AttributionArguments(), training
        )

    with pytest.raises(ValueError, match=r"max_steps=50 is invalid: the token budget num_tokens=2000 holds 10 "):
        distillation(50)
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists(), "nothing recorded or harvested"
    distillation(10).state.close()  # the corrected command is not refused as "a run with other settings"


@pytest.mark.parametrize("cached", [False, True], ids=["streamed", "cached"])
def test_no_stage_of_a_training_run_reads_outside_its_slice(tiny_lm_dir, tmp_path, cached, monkeypatch):
    """Training, the decoder bias's median and the threshold's calibration (asked for 16 384 rows of a 2000-row
    budget) read only the training slice's token positions; evaluation only the held-out slice's."""
    from hf_dmsae import DMSAEModel
    from hf_dmsae.run.arguments import SAEArguments, sae_config
    from hf_dmsae.run.training import train_sae

    args = tiny_activation_args(tiny_lm_dir, num_tokens=2000, activation_cache=str(tmp_path / "c") if cached else None)
    data = tiny_run_data(
        tmp_path / "run",
        args,
        calibrate_threshold_rows=16_384,
        init_decoder_bias_rows=4096,
        save_strategy="no",
        report_to="none",
    )
    read = []
    harvest = data.harvester._batches

    def recorded(split, *arguments, **options):
        for harvested in harvest(split, *arguments, **options):
            read.append((split, harvested.tensors["positions"]))
            yield harvested

    monkeypatch.setattr(data.harvester, "_batches", recorded)
    piece = data.training_slice("train")
    train_sae(DMSAEModel(sae_config(SAEArguments(dict_size=64, k=4), data)), data, piece, data.training_args)
    slices = {s.name: s for s in data.state.slices}
    assert slices["train"].end is not None and read
    for split, positions in read:
        allowed = [s for s in slices.values() if s.split == split]
        inside = torch.zeros(len(positions), dtype=torch.bool)
        for s in allowed:
            inside |= (positions >= s.start.sequence * 32) & (positions < s.end.sequence * 32)
        assert inside.all(), f"{int((~inside).sum())} positions of {split!r} outside {[s.name for s in allowed]}"
    trained = torch.cat([p for split, p in read if split == piece.split])
    assert trained.max() >= slices["train"].start.sequence * 32, "the training slice itself was read"


def test_a_tokenizer_without_bos_is_refused_unless_no_position_is_reserved_for_it():
    from conftest import small_tokenizer

    tokenizer = small_tokenizer(corpus_documents=200, vocab_size=300)
    tokenizer.bos_token = None
    texts = wiki_summaries()["train"]["text"][:20]
    with pytest.raises(ValueError, match="has no BOS token: set prepend_bos false"):
        TokenPacking(tokenizer, 16)
    sequences = [ids for ids, _ in TokenPacking(tokenizer, 16, prepend_bos=False).sequences(texts)]
    body = ActivationArguments(context_length=16, prepend_bos=False).body_length
    assert sequences and all(len(ids) == body == 16 for ids in sequences), "every position is counted in budgets"
