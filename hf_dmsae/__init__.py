"""hf_dmsae: Distilled Matryoshka Sparse Autoencoders, native to the Hugging Face stack.

Importing the package registers the `dmsae` model type with `AutoConfig` and `AutoModel`; saved models also carry
`auto_map`, so `AutoModel.from_pretrained(repo, trust_remote_code=True)` works without the package.

The package is laid out by the method's stages, each a subpackage that imports only those below it: `utils`, `model`
and `data` at the bottom, then `publishing`, `evaluation`, `run` (a run's arguments, folder, data, Trainer and
training), `method` (attribution, distillation, transfer), `studies`, and `commands` on top. The names most used are
also importable from here (the heavier ones on first use).
"""

from importlib import import_module

from transformers import AutoConfig, AutoModel

from .model.configuration_dmsae import DMSAEConfig, matryoshka_group_sizes, noncore_k
from .model.modeling_dmsae import DMSAEModel, DMSAEOutput

AutoConfig.register(DMSAEConfig.model_type, DMSAEConfig)
AutoModel.register(DMSAEConfig, DMSAEModel)
DMSAEConfig.register_for_auto_class()
DMSAEModel.register_for_auto_class("AutoModel")

__version__ = "0.1.0"

_LAZY = {
    "DMSAECore": "model.core",
    "DMSAETrainer": "run.trainer",
    "DMSAETrainingArguments": "run.trainer",
    "Distillation": "method.distillation",
    "Transfer": "method.transfer",
    "load_cycle0": "publishing.formats",
    "save_dictionary_learning": "publishing.formats",
    "save_sae_lens": "publishing.formats",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DMSAEConfig", "DMSAEModel", "DMSAEOutput", "matryoshka_group_sizes", "noncore_k", *_LAZY]
