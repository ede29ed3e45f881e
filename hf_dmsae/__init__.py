"""hf_dmsae: Distilled Matryoshka Sparse Autoencoders, native to the Hugging Face stack.

Importing the package registers the `dmsae` model type with `AutoConfig` and `AutoModel`; saved models also carry
`auto_map`, so `AutoModel.from_pretrained(repo, trust_remote_code=True)` works without the package.
"""

from transformers import AutoConfig, AutoModel

from .configuration_dmsae import DMSAEConfig, matryoshka_group_sizes, noncore_k
from .modeling_dmsae import DMSAEModel, DMSAEOutput

AutoConfig.register(DMSAEConfig.model_type, DMSAEConfig)
AutoModel.register(DMSAEConfig, DMSAEModel)
DMSAEConfig.register_for_auto_class()
DMSAEModel.register_for_auto_class("AutoModel")

__version__ = "0.1.0"

__all__ = ["DMSAEConfig", "DMSAEModel", "DMSAEOutput", "matryoshka_group_sizes", "noncore_k"]
