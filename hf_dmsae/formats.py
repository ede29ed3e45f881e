"""dictionary_learning's Matryoshka BatchTopK checkpoints (SAEBench's format, docs/method.md §6) in and out.

A checkpoint folder holds `ae.pt` (a state dict: `W_enc [d, n]` — transposed against ours —, `b_enc [n]`,
`W_dec [n, d]`, `b_dec [d]`, `k`, `threshold`, `group_sizes`) and `config.json` (`{"trainer": {...}, "buffer":
{...}}`). Its weights act on raw activations, with one global inference threshold on every latent.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .configuration_dmsae import DMSAEConfig
from .integrity import read_json
from .modeling_dmsae import DMSAEModel

TRAINER_CLASS = "MatryoshkaBatchTopKTrainer"
DICT_CLASS = "MatryoshkaBatchTopKSAE"


def _trainer_config(folder: Path) -> dict:
    for name in ("ae.pt", "config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a dictionary_learning checkpoint: {name} is missing")
    trainer = read_json(folder / "config.json").get("trainer", {})
    if trainer.get("trainer_class") != TRAINER_CLASS:
        raise ValueError(f"{folder} holds a {trainer.get('trainer_class')}, not a {TRAINER_CLASS} checkpoint")
    return trainer


def check_checkpoint_fits(folder: str | Path, activations, d_in: int) -> None:
    """Refuse a checkpoint made for another LM, layer or width than the run's activations (`ActivationArguments`),
    naming what differs. LM names are compared by their last path component (a local copy of a Hub model fits)."""
    folder = Path(folder)
    trainer = _trainer_config(folder)
    state = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)
    recorded_lm = str(trainer.get("lm_name") or "")
    differences = []
    if state["W_enc"].shape[0] != d_in:
        differences.append(f"width {state['W_enc'].shape[0]} (the run's activations: {d_in})")
    if trainer.get("layer") is not None and trainer["layer"] != activations.hook_layer:
        differences.append(f"layer {trainer['layer']} (the run's hook_layer: {activations.hook_layer})")
    run_lm = activations.model_name_or_path.rstrip("/").split("/")[-1].lower()
    if recorded_lm and recorded_lm.rstrip("/").split("/")[-1].lower() != run_lm:
        differences.append(f"LM {recorded_lm!r} (the run's: {activations.model_name_or_path!r})")
    if differences:
        raise ValueError(f"{folder} was trained for another model: {'; '.join(differences)}")


def load_dictionary_learning(folder: str | Path, cycle: int = 0) -> DMSAEModel:
    """A dictionary_learning Matryoshka BatchTopK checkpoint as a coreless `DMSAEModel` (distillation cycle 0):
    same weights, groups, `k` and threshold; latent ids `"cycle{cycle}:{index}"`."""
    folder = Path(folder)
    trainer = _trainer_config(folder)
    state = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)
    d_in, dict_size = state["W_enc"].shape
    config = DMSAEConfig(
        d_in=d_in,
        dict_size=dict_size,
        group_sizes=[int(g) for g in state["group_sizes"]],
        k=int(state["k"]),
        k_noncore=int(state["k"]),
        cycle=cycle,
        base_model=trainer.get("lm_name"),
        hook_layer=trainer.get("layer"),
        hook_name="resid_post",
    )
    model = DMSAEModel(config)
    with torch.no_grad():
        model.W_enc_trainable.copy_(state["W_enc"].T)
        model.b_enc.copy_(state["b_enc"])
        model.W_dec.copy_(state["W_dec"])
        model.b_dec.copy_(state["b_dec"])
        model.threshold.copy_(state["threshold"])
    return model


def save_dictionary_learning(model: DMSAEModel, folder: str | Path) -> Path:
    """Write `model` as a dictionary_learning Matryoshka BatchTopK checkpoint that SAEBench's loader takes.

    The normalisation factor is folded into the weights (latents scale by it, as dictionary_learning's
    `scale_biases` does), so the checkpoint reads raw activations. The format has one global threshold and no
    unmasked core: a dense-core model's core latents are thresholded there like the others.
    """
    config, scale = model.config, model.config.norm_factor
    group_sizes = [config.prefix_ends[0]] + config.group_sizes[1:]
    state = {
        "W_enc": model.W_enc.detach().T.contiguous().float().cpu(),
        "b_enc": (model.b_enc.detach() * scale).float().cpu(),
        "W_dec": model.W_dec.detach().float().cpu().clone(),
        "b_dec": (model.b_dec.detach() * scale).float().cpu(),
        "k": torch.tensor(config.k, dtype=torch.int),
        "threshold": (model.threshold.detach() * scale).float().cpu(),
        "group_sizes": torch.tensor(group_sizes),
    }
    trainer = {
        "trainer_class": TRAINER_CLASS,
        "dict_class": DICT_CLASS,
        "activation_dim": config.d_in,
        "dict_size": config.dict_size,
        "k": config.k,
        "group_sizes": group_sizes,
        "group_fractions": [g / config.dict_size for g in group_sizes],
        "layer": config.hook_layer,
        "lm_name": config.base_model,
        "submodule_name": f"resid_post_layer_{config.hook_layer}",
        "dmsae": {"core_size": config.core_size, "sparsity": config.sparsity, "k_noncore": config.k_noncore},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": config.d_in}}, indent=2))
    return folder
