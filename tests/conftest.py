import contextlib
import os
import subprocess
import sys
import tempfile

from hub_server import HubServer

# The loopback Hub must be the endpoint before huggingface_hub is imported: it reads HF_ENDPOINT once. Subprocesses
# started by tests inherit it. A fresh HF_HOME keeps downloads from the real cache.
HUB = HubServer().__enter__()
os.environ["HF_ENDPOINT"] = HUB.url
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_dmsae import DMSAEConfig, DMSAEModel  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="where the tests that take the `device` fixture run their models and tensors (e.g. cuda); "
        "the others run on the CPU",
    )


def pytest_configure(config):
    if torch.device(config.getoption("--device")).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device (a CPU build of torch, or no GPU)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of `--device`: the sparse kernels, the reference they are checked against, the frozen rows and
    the training step's synchronisation are tested there (CUDA on a GPU machine; the CPU in CI)."""
    return torch.device(request.config.getoption("--device"))


def tiny_config(**overrides) -> DMSAEConfig:
    """A small DMSAE config: 16-d inputs, 128 latents, a core of 8."""
    core_size = overrides.pop("core_size", 8)
    settings = dict(
        d_in=16, dict_size=128, core_size=core_size, k=8, core_ids=[f"cycle0:{i}" for i in range(core_size)]
    )
    settings.update(overrides)
    return DMSAEConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> DMSAEModel:
    """A DMSAE with a random frozen core (fixed seed)."""
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    core_rows = torch.randn(config.core_size, config.d_in)
    return DMSAEModel.from_core(config, core_rows)


@pytest.fixture
def model() -> DMSAEModel:
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama (4 blocks, width 32) with the real SmolLM2 tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_dmsae.data.embedded import smollm2_folder

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def core_of_rows(encoder_rows: torch.Tensor, cycle: int = 3, **fields):
    """A core of `encoder_rows` (ids `cycle<cycle>:<i>`) as a transfer reads one: no candidate pool, scores 1."""
    from hf_dmsae.model.core import DMSAECore

    count = len(encoder_rows)
    values = dict(
        latent_ids=[f"cycle{cycle}:{i}" for i in range(count)],
        scores=torch.ones(count),
        pool_ids=[],
        pool_scores=torch.ones(0),
        coverage_curve=torch.ones(0),
    )
    return DMSAECore(encoder_rows=encoder_rows, **{**values, **fields})


def tiny_activation_args(tiny_lm_dir, **overrides):
    """Activation arguments for the tiny LM on the embedded corpus (fast: a few thousand tokens)."""
    from hf_dmsae.data.activations import ActivationArguments

    settings = dict(
        model_name_or_path=str(tiny_lm_dir),
        hook_layer=2,
        context_length=32,
        lm_batch_size=16,
        num_tokens=4000,
        eval_tokens=1000,
        shuffle_buffer_tokens=1024,
        norm_tokens=512,
    )
    settings.update(overrides)
    return ActivationArguments(**settings)


def quiet_training_args(output_dir, **overrides):
    """Training arguments for a test's run: batches of 200 rows, no checkpoints, reports or progress bars."""
    from hf_dmsae.run.trainer import DMSAETrainingArguments

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=200,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    return DMSAETrainingArguments(**{**settings, **overrides})


def tiny_run_data(folder, activation_args, **training_overrides):
    """A run state in `folder` and the data it reads (LM, statistics, slices) for `activation_args`."""
    from hf_dmsae.run.data import RunData
    from hf_dmsae.run.state import RunState, arguments_identity
    from hf_dmsae.run.trainer import DMSAETrainingArguments

    settings = dict(output_dir=str(folder), report_to="none", disable_tqdm=True, per_device_train_batch_size=200)
    training = DMSAETrainingArguments(**{**settings, **training_overrides})
    state = RunState(folder, "test", arguments_identity(activation_args, training), writer=True)
    return RunData(activation_args, training, state)


def write_text_folder(folder, splits: dict[str, int], offset: int = 0):
    """A folder of JSON-lines files (one per split) holding Wikipedia summaries of the embedded corpus: a local text
    dataset that `datasets` loads (and streams) like a Hub one."""
    import json

    from hf_dmsae.data.embedded import wiki_summaries

    texts = wiki_summaries()["train"]["text"]
    folder.mkdir(parents=True, exist_ok=True)
    start = offset
    for split, count in splits.items():
        rows = [{"text": t} for t in texts[start : start + count]]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        start += count
    return folder


def token_positions(rows, harvester, split: str, sequences: int) -> set[int]:
    """The stream positions (sequence × context_length + column) of `rows`, found by their content among the first
    `sequences` sequences of `split`. Rows whose content occurs at more than one position (identical contexts, e.g.
    the same first token after the BOS) identify nothing and are left out; every other row must be found."""
    from hf_dmsae.data.text import StreamPosition

    where: dict[bytes, list[int]] = {}
    for batch in harvester.batches(split, StreamPosition(), max_sequences=sequences):
        for row, position in zip(batch.tensors["activations"], batch.tensors["positions"].tolist(), strict=True):
            where.setdefault(row.float().numpy().tobytes(), []).append(position)
    found = [where.get(row.float().numpy().tobytes()) for row in rows]
    assert all(f is not None for f in found), "rows that come from outside the searched sequences"
    unique = [f[0] for f in found if len(f) == 1]
    assert len(unique) > 0.8 * len(rows), "too few rows identify their position"
    return set(unique)


def small_tokenizer(corpus_documents: int = 3000, vocab_size: int = 1024):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on the embedded corpus: stands in for a real LM's
    tokenizer where a large vocabulary would only cost time (full logits in attribution and SAEBench's evals)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_dmsae.data.embedded import wiki_summaries

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(wiki_summaries()["train"]["text"][:corpus_documents], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def small_vocab_lm_dir(tmp_path_factory):
    """A tiny random Llama (4 blocks, width 32) with a 1024-token BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = small_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("small-vocab-lm")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory):
    """A tiny random `Gemma2ForCausalLM` with Gemma-2's architecture flags (logit soft-capping, alternating sliding
    and global attention with a window the 1024-token context exceeds, GELU-tanh, query scaling by the head dim) and
    14 blocks, so the paper config's layer 12 exists; a small BPE tokenizer stands in for Gemma's."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    tokenizer = small_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=14,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=512,
        hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-gemma2")
    Gemma2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def results_written_by_another_study(path):
    """`path`, a study's `results.json`, held by another process as a running study holds it (`StudyResults`)."""
    script = (
        "import sys\nfrom hf_dmsae.run.results import StudyResults\n"
        f"held = StudyResults({str(path)!r}, None, {{}})\nprint('held', flush=True)\nsys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
