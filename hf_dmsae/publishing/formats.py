"""Other libraries' SAE formats in and out (docs/method.md §6).

- dictionary_learning's Matryoshka BatchTopK checkpoints (SAEBench's releases): a folder with `ae.pt` (a state dict:
  `W_enc [d, n]` — transposed against ours —, `b_enc [n]`, `W_dec [n, d]`, `b_dec [d]`, `k`, `threshold`,
  `group_sizes`) and `config.json` (`{"trainer": {...}, "buffer": {...}}`). Its weights act on raw activations, with
  one global inference threshold on every latent.
- SAELens (what Neuronpedia and SAELens' users load): a folder with `cfg.json` and `sae_weights.safetensors`. At
  inference a DMSAE is a JumpReLU SAE, so it is written as one, by SAELens' own classes.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from ..data.embedded import hub_name, same_model
from ..model.configuration_dmsae import DMSAEConfig
from ..model.modeling_dmsae import DMSAEModel
from ..utils.integrity import IntegrityError, check_finite, check_safetensors_size, read_json

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


SAE_LENS_FILES = ("cfg.json", "sae_weights.safetensors")
SAE_LENS_ARCHITECTURES = ("standard", "topk", "jumprelu")


def _sae_lens_cfg(folder: Path) -> dict:
    """A SAELens SAE's `cfg.json`, after checking that the weights file holds every tensor at the shape it implies."""
    cfg = read_json(folder / "cfg.json", {"d_in": int, "d_sae": int})
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    _, header = check_safetensors_size(folder / SAE_LENS_FILES[1])
    shapes = {"W_enc": [d_in, d_sae], "W_dec": [d_sae, d_in], "b_enc": [d_sae], "b_dec": [d_in]}
    if "threshold" in header:
        shapes["threshold"] = [d_sae]
    _check_shapes(folder / SAE_LENS_FILES[1], {k: v["shape"] for k, v in header.items() if k != "__metadata__"}, shapes)
    return cfg


def _check_shapes(path: Path, found: dict[str, list[int]], wanted: dict[str, list[int]]) -> None:
    """Refuse weights whose tensors are missing or of another shape than their config says, naming them."""
    problems = [
        f"{name} missing" if name not in found else f"{name} is {list(found[name])}, not {shape}"
        for name, shape in wanted.items()
        if name not in found or list(found[name]) != shape
    ]
    if problems:
        raise IntegrityError(f"{path} does not hold the SAE its config describes: {'; '.join(problems)}")


def _usable_k(k, dict_size: int, folder: Path) -> int:
    if k is None or isinstance(k, bool) or not 1 <= int(k) <= dict_size:
        raise ValueError(f"{folder}: k={k} cannot score its latents: a BatchTopK target in [1, {dict_size}] is needed")
    return int(k)


def parse_hook_point(name: str | None) -> tuple[int, str] | None:
    """`(layer, hook)` of a TransformerLens hook name (`blocks.12.hook_resid_post` → `(12, "resid_post")`)."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", str(name or ""))
    return (int(match.group(1)), match.group(2)) if match else None


def hook_point(config: DMSAEConfig) -> str:
    """The hook's TransformerLens name, as SAELens, SAEBench and Neuronpedia name it (`blocks.12.hook_resid_post`)."""
    if config.hook_layer is None or config.hook_name is None:
        raise ValueError("the DMSAE's config must name its hook (hook_layer and hook_name)")
    return f"blocks.{config.hook_layer}.hook_{config.hook_name}"


def is_sae_lens(folder: str | Path) -> bool:
    """Whether `folder` holds a SAELens SAE (else it must be a dictionary_learning checkpoint)."""
    return all((Path(folder) / name).is_file() for name in SAE_LENS_FILES)


def checkpoint_weights(folder: str | Path) -> Path:
    """The weights file of a cycle-0 checkpoint: dictionary_learning's `ae.pt` or SAELens' safetensors."""
    folder = Path(folder)
    if is_sae_lens(folder):
        return folder / SAE_LENS_FILES[1]
    _trainer_config(folder)
    return folder / "ae.pt"


def _checkpoint_target(folder: Path) -> tuple[int, int | None, str | None, str]:
    """`(d_in, layer, hook, LM name)` a cycle-0 checkpoint was trained for (layer and hook None when unrecorded;
    dictionary_learning's checkpoints read the residual stream after the layer)."""
    if is_sae_lens(folder):
        cfg = _sae_lens_cfg(folder)
        metadata = cfg.get("metadata") or {}
        layer, hook = parse_hook_point(metadata.get("hook_name")) or (None, None)
        return int(cfg["d_in"]), layer, hook, str(metadata.get("model_name") or "")
    trainer = _trainer_config(folder)
    d_in = _dictionary_learning_state(folder)["W_enc"].shape[0]
    return d_in, trainer.get("layer"), "resid_post", str(trainer.get("lm_name") or "")


def check_checkpoint_fits(folder: str | Path, activations, d_in: int) -> None:
    """Refuse a checkpoint made for another LM, layer or width than the run's activations (`ActivationArguments`),
    naming what differs. LM names are compared by `data.embedded.same_model`."""
    folder = Path(folder)
    differences = fit_differences(*_checkpoint_target(folder), activations, d_in)
    if differences:
        raise ValueError(f"{folder} was trained for another model: {'; '.join(differences)}")


def fit_differences(
    width: int, layer: int | None, hook: str | None, lm: str | None, activations, d_in: int
) -> list[str]:
    """What of an SAE's `(width, layer, hook, LM)` differs from the run's activations (`ActivationArguments`, of
    width `d_in`); None is unrecorded. LMs compare by `data.embedded.same_model`."""
    differences = []
    if width != d_in:
        differences.append(f"width {width} (the run's activations: {d_in})")
    if layer is not None and layer != activations.hook_layer:
        differences.append(f"layer {layer} (the run's hook_layer: {activations.hook_layer})")
    if hook is not None and hook != activations.hook_name:
        differences.append(f"hook {hook} (the run's hook_name: {activations.hook_name})")
    if lm and not same_model(lm, activations.model_name_or_path):
        differences.append(f"LM {lm!r} (the run's: {activations.model_name_or_path!r})")
    return differences


def load_cycle0(folder: str | Path, k: int | None = None) -> DMSAEModel:
    """A cycle-0 checkpoint of either format as a coreless `DMSAEModel` (`k`: see `load_sae_lens`)."""
    if is_sae_lens(folder):
        return load_sae_lens(folder, k=k)
    return load_dictionary_learning(folder)


def load_sae_lens(folder: str | Path, cycle: int = 0, k: int | None = None) -> DMSAEModel:
    """A SAELens SAE (standard, TopK or JumpReLU; SAELens saves BatchTopK and Matryoshka BatchTopK SAEs as JumpReLU),
    read by SAELens' own loader, as a coreless `DMSAEModel` for distillation cycle 0.

    Decoder norms are folded into the encoder (as SAELens' `fold_W_dec_norm` does), so every row is a gain along a
    unit decoder direction, like ours; without `apply_b_dec_to_input`, `b_dec`'s effect moves into `b_enc`. The model
    reads raw activations (norm factor 1) and has one group (the saved format records no Matryoshka groups), so every
    latent is a candidate. Attribution masks its latents by BatchTopK at `k`: the SAE's own `k` (TopK), or the `k`
    given, which a JumpReLU or standard SAE does not record; the inference threshold is left unset, so held-out
    metrics use the same masks."""
    from sae_lens import SAE

    folder = Path(folder)
    _sae_lens_cfg(folder)
    sae = SAE.load_from_disk(folder)
    check_finite(sae.state_dict(), folder / SAE_LENS_FILES[1])
    cfg, architecture = sae.cfg, sae.cfg.architecture()
    if architecture not in SAE_LENS_ARCHITECTURES:
        raise ValueError(f"{folder} holds a SAELens {architecture!r} SAE; cycle 0 takes {SAE_LENS_ARCHITECTURES}")
    if cfg.normalize_activations != "none":
        raise ValueError(
            f"{folder}: normalize_activations={cfg.normalize_activations!r} cannot be folded into the "
            "weights; only 'none' is taken"
        )
    k = getattr(cfg, "k", None) or k
    if k is None:
        raise ValueError(
            f"{folder} holds a SAELens {architecture} SAE, which records no k: give the BatchTopK target "
            "its latents are scored with (cycle0_k)"
        )
    k = _usable_k(k, cfg.d_sae, folder)
    with torch.no_grad():
        W_enc, W_dec = sae.W_enc.detach().float().T.clone(), sae.W_dec.detach().float().clone()
        b_enc, b_dec = sae.b_enc.detach().float().clone(), sae.b_dec.detach().float().clone()
        if not cfg.apply_b_dec_to_input:
            b_enc += W_enc @ b_dec  # ours encodes x − b_dec
        norms = W_dec.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        metadata = cfg.metadata
        layer, hook_name = parse_hook_point(metadata.hook_name) or (None, None)
        config = DMSAEConfig(
            d_in=cfg.d_in,
            dict_size=cfg.d_sae,
            group_sizes=[cfg.d_sae],
            k=int(k),
            k_noncore=int(k),
            cycle=cycle,
            base_model=metadata.model_name,
            hook_layer=layer,
            hook_name=hook_name,
        )
        model = DMSAEModel(config)
        model.W_enc_trainable.copy_(W_enc * norms[:, None])
        model.b_enc.copy_(b_enc * norms)
        model.W_dec.copy_(W_dec / norms[:, None])
        model.b_dec.copy_(b_dec)
    return model


def load_dictionary_learning(folder: str | Path, cycle: int = 0) -> DMSAEModel:
    """A dictionary_learning Matryoshka BatchTopK checkpoint as a coreless `DMSAEModel` (distillation cycle 0):
    same weights, groups, `k` and threshold; latent ids `"cycle{cycle}:{index}"`."""
    folder = Path(folder)
    trainer = _trainer_config(folder)
    state = _dictionary_learning_state(folder)
    d_in, dict_size = state["W_enc"].shape
    k = _usable_k(int(state["k"]), dict_size, folder)
    config = DMSAEConfig(
        d_in=d_in,
        dict_size=dict_size,
        group_sizes=[int(g) for g in state["group_sizes"]],
        k=k,
        k_noncore=k,
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


DICTIONARY_LEARNING_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes")


def _dictionary_learning_state(folder: Path) -> dict[str, torch.Tensor]:
    """`ae.pt` of a dictionary_learning checkpoint (tensors only: `weights_only` refuses pickled code), after
    checking every tensor is there, of consistent shapes and finite."""
    path = folder / "ae.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        cause = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), error)
        raise IntegrityError(f"{path} holds more than tensors and is not read ({cause})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(state.get(k)) for k in DICTIONARY_LEARNING_KEYS):
        raise IntegrityError(f"{path} is not a Matryoshka BatchTopK state dict: it needs {DICTIONARY_LEARNING_KEYS}")
    if state["W_enc"].ndim != 2:
        raise IntegrityError(f"{path}: W_enc is {list(state['W_enc'].shape)}, not [d_in, dict_size]")
    d_in, dict_size = state["W_enc"].shape
    shapes = {"b_enc": [dict_size], "W_dec": [dict_size, d_in], "b_dec": [d_in], "threshold": [], "k": []}
    _check_shapes(path, {k: list(v.shape) for k, v in state.items() if torch.is_tensor(v)}, shapes)
    if int(state["group_sizes"].sum()) != dict_size or (state["group_sizes"] < 1).any():
        raise IntegrityError(f"{path}: group_sizes {state['group_sizes'].tolist()} do not split {dict_size} latents")
    check_finite(state, path)
    return state


def _check_rectified(model: DMSAEModel, format_name: str) -> None:
    """Both formats rectify every latent; a `linear_core`'s signed latents would lose their negative half."""
    if model.config.core_linear:
        raise ValueError(
            f"a linear_core model has signed core latents, which the {format_name} format (a ReLU on every latent) "
            "cannot hold: keep it in the Hugging Face format (save_pretrained)"
        )


def save_sae_lens(model: DMSAEModel, folder: str | Path, activations=None) -> Path:
    """Write `model` as the SAELens JumpReLU SAE it is at inference (`cfg.json` + `sae_weights.safetensors`, loaded
    by `sae_lens.SAE.load_from_disk`, or from a Hub repo's subfolder by `SAE.from_pretrained(repo, subfolder)`):
    per-latent threshold 0 on the dense core (ReLU only; a `jumprelu_core`'s own learned thresholds) and the
    calibrated threshold on every masked latent. The normalisation factor `s` is folded in (`W_enc/s`, `s·W_dec`,
    `s·b_dec`), so it reads raw activations and gives the same latents and reconstructions as the DMSAE; decoder
    rows then have norm `s`. The metadata names the LM as the Hub does (`data.embedded.hub_name`) and the hook as
    TransformerLens does; with the run's `ActivationArguments` it also holds how the text was read
    (`context_size`, `prepend_bos`, `dataset_path`). The DMSAE's own settings (core, groups, sparsity, k) travel in
    it too."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    _check_rectified(model, "SAELens")
    config, scale = model.config, model.config.norm_factor
    if float(model.threshold) < 0:
        raise ValueError("the model has no inference threshold yet: train it or call calibrate_threshold first")
    threshold = torch.full((config.dict_size,), float(model.threshold))
    threshold[: config.first_masked_latent] = 0.0
    if model.core_log_threshold is not None:  # `jumprelu_core`: the core's own learned thresholds
        threshold[: config.core_size] = model.core_log_threshold.detach().float().exp()
    read = {}
    if activations is not None:
        read = {
            "context_size": activations.context_length,
            "prepend_bos": activations.prepend_bos,
            "dataset_path": hub_name(activations.dataset_name_or_path),
        }
    metadata = SAEMetadata(
        model_name=hub_name(config.base_model) if config.base_model else None,
        hook_name=hook_point(config),
        hook_layer=config.hook_layer,
        **read,
        dmsae={
            "core_size": config.core_size,
            "core_ids": list(config.core_ids),
            "sparsity": config.sparsity,
            "k": config.k,
            "k_noncore": config.k_noncore,
            "group_sizes": list(config.group_sizes),
            "norm_factor": scale,
            "cycle": config.cycle,
        },
    )
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=config.d_in, d_sae=config.dict_size, dtype="float32", metadata=metadata))
    weights = {
        "W_enc": model.W_enc.detach().float().cpu().div(scale).T.contiguous(),
        "b_enc": model.b_enc.detach().float().cpu().clone(),
        "W_dec": model.W_dec.detach().float().cpu().mul(scale),
        "b_dec": model.b_dec.detach().float().cpu().mul(scale),
        "threshold": threshold,
    }
    sae.load_state_dict(weights)
    sae.save_model(folder)
    return Path(folder)


def save_dictionary_learning(model: DMSAEModel, folder: str | Path) -> Path:
    """Write `model` as a dictionary_learning Matryoshka BatchTopK checkpoint that SAEBench's loader takes.

    The normalisation factor is folded into the weights (latents scale by it, as dictionary_learning's
    `scale_biases` does), so the checkpoint reads raw activations. The format has one global threshold and no
    unmasked core, so only a model whose every latent is under that threshold (no core, or `sparse_core`) is
    written; a core outside it (dense, penalized, JumpReLU, linear) would lose its activations under the threshold
    and a JumpReLU core its own thresholds: those are refused, for `save_sae_lens`'s per-latent thresholds.
    """
    _check_rectified(model, "dictionary_learning")
    if model.config.core_size and model.config.core_unmasked:
        raise ValueError(
            f"a {model.config.sparsity} model's core latents are outside the inference threshold, which the "
            "dictionary_learning format (one global threshold on every latent) cannot hold without dropping their "
            "activations below it: save it with save_sae_lens (a threshold per latent) or save_pretrained"
        )
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
    (folder / "config.json").write_text(
        json.dumps({"trainer": trainer, "buffer": {"d_submodule": config.d_in}}, indent=2)
    )
    return folder
