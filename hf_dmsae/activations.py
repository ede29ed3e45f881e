"""Activations of a causal LM at one hook point, for training and evaluating SAEs.

Text from a `datasets` dataset (streamed for Hub datasets, read for local ones) is tokenised and packed into
sequences of `context_length` tokens; the LM runs only up to the hooked block (the forward pass stops there); positions
holding special tokens (BOS, separators, padding) and the rare attention-sink positions of outsized norm are dropped;
a shuffling buffer mixes tokens across sequences.
`ActivationCache` stores a run of activations as memory-mapped safetensors shards that every distillation cycle can
reuse; its manifest, written last, says what the activations are, and a cache for anything else is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .embedded import EMBEDDED_CORPUS, EMBEDDED_LM, is_embedded, resolve_model, wiki_summaries

logger = logging.getLogger(__name__)

HOOK_POINTS = ("resid_post", "resid_pre")


@dataclass
class ActivationArguments:
    """Where activations come from. Parsed by `HfArgumentParser` in the scripts."""

    model_name_or_path: str = field(default=EMBEDDED_LM, metadata={"help": "Causal LM: Hub name, path or embedded:…"})
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the LM."})
    hook_layer: int = field(default=15, metadata={"help": "Block whose residual stream is read (0-based)."})
    hook_name: str = field(default="resid_post", metadata={"help": f"Hook point, one of {HOOK_POINTS}."})
    dataset_name_or_path: str = field(default=EMBEDDED_CORPUS, metadata={"help": "Text dataset: Hub name or path."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split the training activations come from."})
    eval_split: str = field(default="test", metadata={"help": "Held-out split for evaluation activations."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    streaming: bool | None = field(default=None, metadata={"help": "Stream the dataset (default: Hub datasets)."})
    context_length: int = field(default=128, metadata={"help": "Tokens per LM sequence."})
    prepend_bos: bool = field(default=True, metadata={"help": "Start every sequence with the BOS token."})
    lm_batch_size: int = field(default=16, metadata={"help": "Sequences per LM forward pass."})
    lm_dtype: str = field(default="float32", metadata={"help": "dtype the LM runs in."})
    num_tokens: int = field(default=500_000, metadata={"help": "Training tokens to harvest."})
    eval_tokens: int = field(default=32_768, metadata={"help": "Held-out tokens to harvest for evaluation."})
    shuffle_buffer_tokens: int = field(default=131_072, metadata={"help": "Tokens mixed in the shuffling buffer."})
    norm_tokens: int = field(default=16_384, metadata={"help": "Tokens used to estimate the normalisation factor."})
    outlier_norm_ratio: float = field(
        default=10.0,
        metadata={"help": "Drop positions whose activation norm exceeds this multiple of the median norm (attention "
                  "sinks next to the BOS reach 100×); 0 keeps all."},
    )
    activation_cache: str | None = field(default=None, metadata={"help": "Folder of an on-disk activation cache."})
    cache_dtype: str = field(default="float32", metadata={"help": "dtype of cached activations."})
    harvest_seed: int = field(default=0, metadata={"help": "Seed of the shuffling buffer."})

    def __post_init__(self):
        if self.hook_name not in HOOK_POINTS:
            raise ValueError(f"hook_name={self.hook_name!r} is invalid: must be one of {HOOK_POINTS}")
        for name in ("context_length", "lm_batch_size", "num_tokens", "shuffle_buffer_tokens", "norm_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be at least 1")
        if self.hook_layer < 0:
            raise ValueError(f"hook_layer={self.hook_layer} is invalid: must be non-negative")


def load_language_model(args: ActivationArguments):
    """The causal LM (eval mode, no gradients on its weights) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(args.model_name_or_path)
    lm = AutoModelForCausalLM.from_pretrained(path, revision=args.model_revision, dtype=getattr(torch, args.lm_dtype))
    lm.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=args.model_revision)
    num_layers = lm.config.get_text_config().num_hidden_layers
    if args.hook_layer >= num_layers:
        raise ValueError(f"hook_layer={args.hook_layer} is invalid: {args.model_name_or_path} has {num_layers} blocks")
    return lm, tokenizer


def load_texts(args: ActivationArguments, split: str) -> Iterable[dict]:
    """Rows of the text dataset's `split`: streamed for Hub datasets unless `streaming=False`."""
    from datasets import load_dataset, load_from_disk

    name = args.dataset_name_or_path
    if is_embedded(name):
        if name != EMBEDDED_CORPUS:
            raise ValueError(f"Unknown embedded dataset {name!r}; the embedded corpus is {EMBEDDED_CORPUS!r}")
        return wiki_summaries()[split]
    if Path(name).is_dir() and (Path(name) / "dataset_dict.json").is_file():
        return load_from_disk(name)[split]
    if Path(name).is_dir() and (Path(name) / "state.json").is_file():
        return load_from_disk(name)
    streaming = args.streaming if args.streaming is not None else not Path(name).exists()
    return load_dataset(name, args.dataset_config_name, split=split, streaming=streaming)


def token_sequences(texts: Iterable[str], tokenizer, context_length: int, prepend_bos: bool) -> Iterator[list[int]]:
    """Pack documents, each followed by the EOS token, into sequences of exactly `context_length` tokens."""
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    body = context_length - len(bos)
    pending: list[int] = []
    for batch in batched(texts, 64):
        for ids in tokenizer(list(batch), add_special_tokens=False)["input_ids"]:
            pending.extend(ids + separator)
            while len(pending) >= body:
                yield bos + pending[:body]
                del pending[:body]


def batched(items: Iterable, size: int) -> Iterator[tuple]:
    """Consecutive tuples of `size` items (the last may be shorter); `itertools.batched` before Python 3.12."""
    iterator = iter(items)
    while batch := tuple(itertools.islice(iterator, size)):
        yield batch


class _StopForward(Exception):
    """Raised by the hook to end the forward pass once the hooked block has run."""


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's list of transformer blocks (the `nn.ModuleList` with one entry per hidden layer)."""
    num_layers = lm.config.get_text_config().num_hidden_layers
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"Could not find the {num_layers} decoder blocks of {type(lm).__name__}")


class LayerActivations:
    """A causal LM read at one hook point: `resid_post` is the output of block `layer` (= `hidden_states[layer + 1]`
    of a full forward, except after the last block, where transformers applies the final norm); `resid_pre` is the
    input of block `layer`.

    Calling it runs the LM only up to the hook and returns the activations `[B, T, d]`; `with_gradient` runs the
    whole LM and also returns the gradient of the summed next-token loss with respect to those activations.
    """

    def __init__(self, lm: nn.Module, layer: int, hook_name: str = "resid_post"):
        if hook_name not in HOOK_POINTS:
            raise ValueError(f"hook_name={hook_name!r} is invalid: must be one of {HOOK_POINTS}")
        self.lm, self.block, self.hook_name = lm, decoder_layers(lm)[layer], hook_name

    def _hook(self, transform):
        """Register `transform(hidden) -> hidden` at the hook point (it may raise to end the pass)."""
        if self.hook_name == "resid_post":

            def after_block(module, args, output):
                if isinstance(output, tuple):
                    return (transform(output[0]), *output[1:])
                return transform(output)

            return self.block.register_forward_hook(after_block)

        def before_block(module, args, kwargs):
            if args:
                return (transform(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}

        return self.block.register_forward_pre_hook(before_block, with_kwargs=True)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def capture_and_stop(hidden):
            captured.append(hidden)
            raise _StopForward

        handle = self._hook(capture_and_stop)
        try:
            self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    def patched_logits(self, input_ids: torch.Tensor, transform) -> torch.Tensor:
        """Logits of a full forward with the activations at the hook replaced by `transform(hidden)`."""
        handle = self._hook(transform)
        try:
            return self.lm(input_ids=input_ids, use_cache=False).logits
        finally:
            handle.remove()

    def with_gradient(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations and `∂L/∂x` at the hook, `L` the next-token cross-entropy summed over all positions of the
        batch. The activations become a leaf of the graph, so backward runs through the upper blocks only."""
        captured: list[torch.Tensor] = []

        def make_leaf(hidden):
            leaf = hidden.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf

        handle = self._hook(make_leaf)
        try:
            with torch.enable_grad():
                logits = self.lm(input_ids=input_ids, use_cache=False).logits
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum"
                )
                (gradient,) = torch.autograd.grad(loss, captured[0])
        finally:
            handle.remove()
        return captured[0].detach(), gradient


class TrainingPositions:
    """Which token positions an SAE sees: not special tokens (BOS, separators, padding), and not the rare
    positions whose activation norm exceeds `outlier_norm_ratio` × the median norm of the first batch."""

    def __init__(self, tokenizer, outlier_norm_ratio: float):
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.outlier_norm_ratio = outlier_norm_ratio
        self.median_norm: torch.Tensor | None = None

    def mask(self, input_ids: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        keep = ~torch.isin(input_ids, self.special.to(input_ids.device))
        if self.outlier_norm_ratio > 0:
            norms = acts.detach().float().norm(dim=-1)
            if self.median_norm is None:
                self.median_norm = norms[keep].median()
            keep &= norms <= self.outlier_norm_ratio * self.median_norm
        return keep


def text_batches(args: ActivationArguments, tokenizer, batch_size: int, split: str) -> Iterator[torch.Tensor]:
    """`input_ids` batches `[batch_size, context_length]` of a split, packed as the SAE's training text is."""
    texts = (row[args.text_column] for row in load_texts(args, split))
    for batch in batched(token_sequences(texts, tokenizer, args.context_length, args.prepend_bos), batch_size):
        yield torch.tensor(batch, dtype=torch.long)


def harvest(args: ActivationArguments, lm, tokenizer, split: str, num_tokens: int) -> Iterator[torch.Tensor]:
    """Blocks of activations `[n, d]` (special-token positions dropped) until `num_tokens` rows, in text order."""
    layer = LayerActivations(lm, args.hook_layer, args.hook_name)
    positions = TrainingPositions(tokenizer, args.outlier_norm_ratio)
    produced = 0
    with tqdm(total=num_tokens, desc=f"activations ({split})", unit="tok", unit_scale=True) as progress:
        for input_ids in text_batches(args, tokenizer, args.lm_batch_size, split):
            input_ids = input_ids.to(lm.device)
            with torch.inference_mode():
                acts = layer(input_ids)
            rows = acts[positions.mask(input_ids, acts)].float().cpu()[: num_tokens - produced]
            produced += len(rows)
            progress.update(len(rows))
            yield rows
            if produced >= num_tokens:
                return
    if produced < num_tokens:
        raise ValueError(f"{args.dataset_name_or_path} ({split}) yields only {produced} tokens, {num_tokens} asked")


def shuffled(blocks: Iterable[torch.Tensor], buffer_tokens: int, seed: int) -> Iterator[torch.Tensor]:
    """Mix rows across blocks: fill a buffer, shuffle it, emit half, refill; flush the rest at the end."""
    generator = torch.Generator().manual_seed(seed)
    pending, count = [], 0
    for block in blocks:
        pending.append(block)
        count += len(block)
        if count >= buffer_tokens:
            buffer = torch.cat(pending)
            buffer = buffer[torch.randperm(len(buffer), generator=generator)]
            half = len(buffer) // 2
            yield buffer[:half]
            pending, count = [buffer[half:]], len(buffer) - half
    if count:
        buffer = torch.cat(pending)
        yield buffer[torch.randperm(len(buffer), generator=generator)]


def norm_factor(rows: torch.Tensor) -> float:
    """√E‖x‖²: dividing by it gives activations of unit mean squared norm."""
    return math.sqrt(rows.double().pow(2).sum(-1).mean().item())


def collate_activations(batch) -> dict[str, torch.Tensor]:
    """DataLoader collate function: a batch gathered at once (`ActivationCache.__getitems__`) or a list of rows."""
    if torch.is_tensor(batch):
        return {"activations": batch}
    return {"activations": torch.stack([item["activations"] for item in batch])}


class StreamingActivations(torch.utils.data.IterableDataset):
    """Activations harvested while training (no cache), mixed by the shuffling buffer: for token budgets too large
    to store. Deterministic for a given seed, so a resumed run sees the same rows."""

    def __init__(self, args: ActivationArguments, lm, tokenizer, split: str, num_tokens: int):
        self.args, self.lm, self.tokenizer, self.split, self.num_tokens = args, lm, tokenizer, split, num_tokens
        self.d_in = lm.config.get_text_config().hidden_size
        self._first = torch.cat(list(harvest(args, lm, tokenizer, split, min(args.norm_tokens, num_tokens))))
        self.norm_factor = norm_factor(self._first)

    def sample(self, n: int) -> torch.Tensor:
        """Up to `n` rows from the start of the stream (those the normalisation factor was estimated on)."""
        return self._first[:n]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        blocks = harvest(self.args, self.lm, self.tokenizer, self.split, self.num_tokens)
        for block in shuffled(blocks, self.args.shuffle_buffer_tokens, self.args.harvest_seed):
            for row in block:
                yield {"activations": row}


def activation_dataset(args: ActivationArguments, lm, tokenizer, split: str, num_tokens: int):
    """The activations of `split` as a Dataset: the on-disk cache under `args.activation_cache/<split>` when a
    cache folder is given (built on first use), else streamed from the LM."""
    if args.activation_cache is None:
        return StreamingActivations(args, lm, tokenizer, split, num_tokens)
    return ActivationCache.build(Path(args.activation_cache) / split, args, lm, tokenizer, split, num_tokens)




# ---------------------------------------------------------------------------------------------------------------
# On-disk cache


_MANIFEST = "cache.json"
_SHARD_ROWS = 65_536


def cache_identity(args: ActivationArguments, split: str, num_tokens: int) -> dict:
    """What a cache's activations are: a cache is reused only where all of this matches (the LM batch size too:
    the outlier filter's reference norm comes from the first batch)."""
    keys = ("model_name_or_path", "model_revision", "hook_layer", "hook_name", "dataset_name_or_path",
            "dataset_config_name", "text_column", "context_length", "prepend_bos", "lm_dtype", "cache_dtype",
            "harvest_seed", "shuffle_buffer_tokens", "outlier_norm_ratio", "lm_batch_size")  # fmt: skip
    values = {k: v for k, v in asdict(args).items() if k in keys}
    return {**values, "split": split, "num_tokens": num_tokens}


def _safetensors_rows(path: Path) -> np.memmap:
    """Memory-map the single tensor `activations` of a safetensors shard (header: u64 length + JSON)."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    info = header["activations"]
    start, _ = info["data_offsets"]
    np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[info["dtype"]]
    return np.memmap(path, dtype=np_dtype, mode="r", offset=8 + header_len + start, shape=tuple(info["shape"]))


class ActivationCache(torch.utils.data.Dataset):
    """A finished run of activations on disk: shards `shard-NNNNN.safetensors` (tensor `activations` `[n, d]`) and
    `cache.json` (identity, shard sizes, normalisation factor), written last. Rows are memory-mapped.

    Indexing by a list of rows (`__getitems__`, used by the DataLoader) gathers a whole batch at once.
    """

    def __init__(self, path: str | os.PathLike, expected_identity: dict | None = None):
        self.path = Path(path)
        manifest_path = self.path / _MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a finished activation cache (no {_MANIFEST})")
        self.manifest = json.loads(manifest_path.read_text())
        if expected_identity is not None and self.manifest["identity"] != expected_identity:
            found = self.manifest["identity"]
            diff = {k: (found.get(k), v) for k, v in expected_identity.items() if found.get(k) != v}
            raise ValueError(
                f"The activation cache at {self.path} was made for other activations; (cached, wanted): {diff}. "
                "Use another activation_cache folder or delete this one."
            )
        self._dtype = getattr(torch, self.manifest["identity"]["cache_dtype"])
        self._shards = [_safetensors_rows(self.path / name) for name in self.manifest["shards"]]
        sizes = torch.tensor([0] + [len(s) for s in self._shards])
        self._starts = sizes.cumsum(0)
        self.d_in = int(self.manifest["d_in"])
        self.norm_factor = float(self.manifest["norm_factor"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _rows(self, shard: int, local: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(np.ascontiguousarray(self._shards[shard][local]))
        return rows.view(torch.bfloat16) if self._dtype == torch.bfloat16 else rows

    def __getitems__(self, indices) -> torch.Tensor:
        index = torch.as_tensor(indices, dtype=torch.long)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for a cache of {len(self)} rows")
        shard = torch.searchsorted(self._starts, index, right=True) - 1
        out = torch.empty(len(index), self.d_in, dtype=self._dtype)
        for s in shard.unique().tolist():
            selected = shard == s
            out[selected] = self._rows(s, (index[selected] - self._starts[s]).numpy())
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"activations": self.__getitems__([index])[0]}

    def sample(self, n: int) -> torch.Tensor:
        """The first `n` rows (already shuffled when the cache was written)."""
        return self.__getitems__(list(range(min(n, len(self)))))

    @classmethod
    def build(
        cls, path: str | os.PathLike, args: ActivationArguments, lm, tokenizer, split: str, num_tokens: int
    ) -> ActivationCache:
        """Open the cache at `path` if it holds these activations, else harvest and write it. Shards go to a
        staging folder renamed into place only after the manifest is written, so a crash never leaves a cache
        that looks whole."""
        path = Path(path)
        identity = cache_identity(args, split, num_tokens)
        if (path / _MANIFEST).is_file():
            return cls(path, expected_identity=identity)
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"{path} exists but is not a finished activation cache; delete it or choose another")
        staging = path.with_name(path.name + ".partial-" + hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:8])
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        dtype = getattr(torch, args.cache_dtype)
        first: list[torch.Tensor] = []  # the first norm_tokens rows in text order, as StreamingActivations sees them

        def noting_first(blocks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
            for block in blocks:
                if (seen := sum(map(len, first))) < args.norm_tokens:
                    first.append(block[: args.norm_tokens - seen])
                yield block

        harvested = noting_first(harvest(args, lm, tokenizer, split, num_tokens))
        shards, pending = [], torch.empty(0)
        for block in itertools.chain(shuffled(harvested, args.shuffle_buffer_tokens, args.harvest_seed), [None]):
            if block is not None:
                pending = torch.cat([pending, block]) if len(pending) else block
            while len(pending) >= _SHARD_ROWS or (block is None and len(pending)):
                name = f"shard-{len(shards):05d}.safetensors"
                save_file({"activations": pending[:_SHARD_ROWS].to(dtype).contiguous()}, staging / name)
                shards.append(name)
                pending = pending[_SHARD_ROWS:]
        manifest = {"identity": identity, "shards": shards, "d_in": lm.config.get_text_config().hidden_size,
                    "norm_factor": norm_factor(torch.cat(first))}  # fmt: skip
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
        logger.info("Activation cache written to %s (%d tokens)", path, num_tokens)
        return cls(path, expected_identity=identity)
