"""A DMSAE as SAEBench sees it, and the LM as TransformerLens loads it.

SAEBench evaluates any `BaseSAE` (its custom-SAE contract) and loads the LM through TransformerLens by name.
TransformerLens's loaders read any local Hugging Face folder of a supported architecture, but its `from_pretrained`
accepts only names in its registry; `transformer_lens_name` registers a local model (the embedded SmolLM2, a
fine-tuned checkpoint, a Hub model outside the registry after download) under its folder name, so every SAEBench
eval loads it through its own code path, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sae_bench.custom_saes.base_sae import BaseSAE

from ..data.embedded import resolve_model
from ..model.modeling_dmsae import DMSAEModel
from ..publishing.formats import hook_point


class SAEBenchSAE(BaseSAE):
    """A `DMSAEModel` under SAEBench's custom-SAE contract, in raw activation units.

    SAEBench reads `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec` for weight-based metrics and
    calls `encode`/`decode`/`forward` on raw LM activations. The DMSAE works on activations divided by its
    `norm_factor`; latents here are the DMSAE's times that factor, so the exported weights act on raw activations
    exactly as `encode`/`decode` do (the convention of dictionary_learning checkpoints). Encoding uses the
    inference mask: the dense core unmasked and the learned threshold on the rest.
    """

    def __init__(
        self, sae: DMSAEModel, model_name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ):
        config = sae.config
        super().__init__(
            config.d_in,
            config.dict_size,
            model_name,
            config.hook_layer,
            torch.device(device),
            dtype,
            hook_name=hook_point(config),
        )
        self.sae = sae.eval()
        self.scale = config.norm_factor
        with torch.no_grad():
            self.W_enc.copy_(sae.W_enc.T)
            self.b_enc.copy_(sae.b_enc * self.scale)
            self.W_dec.copy_(sae.W_dec)
            self.b_dec.copy_(sae.b_dec * self.scale)
        self.cfg.architecture = f"dmsae_{config.sparsity}"
        self.to(device=torch.device(device), dtype=dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (self.sae.encode(x) * self.scale).to(x.dtype)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(feature_acts.to(self.sae.dtype) / self.scale).to(feature_acts.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def transformer_lens_name(model_name_or_path: str) -> str:
    """The name under which TransformerLens (and so SAEBench) loads `model_name_or_path`.

    Names in TransformerLens's registry are returned unchanged. Anything else is resolved to a local folder
    (embedded names to their converted folder, Hub names downloaded) and registered in that registry under the
    folder's name, pointing at the folder: TransformerLens's own config and weight loaders read it from there.
    """
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens import supported_models

    path = resolve_model(model_name_or_path)
    if not Path(path).is_dir():
        if model_name_or_path.lower() in loading.make_model_alias_map():
            return model_name_or_path
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    path = str(Path(path).resolve())
    alias = Path(path).name
    if path not in supported_models.OFFICIAL_MODEL_NAMES:
        supported_models.OFFICIAL_MODEL_NAMES.append(path)
        supported_models.MODEL_ALIASES[path] = [alias]
    return alias
