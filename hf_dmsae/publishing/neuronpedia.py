"""Feature data for Neuronpedia: the browser's statistics (`FeatureStatistics`, `LogitEffects`) written in the batch
format SAEDashboard's Neuronpedia runner writes and Neuronpedia's import reads: `FORMAT`, one `batch-<i>.json` per
`features_per_batch` latents (a `NeuronpediaDashboardBatch`: the model id, layer, SAE set and each latent's top
activations with per-token values, activation histogram, logit tables and histogram, firing frequency) and
`run_settings.json`. Fields SAEDashboard fills from the LM's neurons (alignment, correlations) stay empty lists.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.embedded import short_name
from ..model.modeling_dmsae import DMSAEModel
from .browser import BIN_EDGES, FeatureStatistics, LogitEffects
from .formats import hook_point

FORMAT = "SAEDashboard 0.8.0, sae_dashboard.neuronpedia.neuronpedia_dashboard.NeuronpediaDashboardBatch"
NEURON_FIELDS = (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
)
"""What SAEDashboard computes from the LM's MLP neurons and other features; left empty, as its defaults are."""
TOP_ACTIVATIONS_BIN = {"bin_min": -1, "bin_max": 99, "bin_contains": -1}
"""How SAEDashboard marks the top-activations group (its intervals' bins are not computed here)."""


def model_id(sae: DMSAEModel) -> str:
    """Neuronpedia's id of the SAE's LM: its `short_name` (`gemma-2-2b`, `gpt2`)."""
    return short_name(sae.config.base_model)


def _rounded(values) -> list[float]:
    return [round(float(v), 3) for v in values]


def feature_record(j: int, tokenizer, stats: FeatureStatistics, effects: LogitEffects, read: dict, before: int) -> dict:
    """Latent `j` as a `NeuronpediaDashboardFeature` (its `to_dict`); `read` holds the text's `dataset`,
    `n_prompts_total` and `n_tokens_in_prompt`; `before`: the activating token's place in a context window."""
    activations = []
    for k in range(len(stats.values)):
        if stats.values[k, j] <= 0:
            break
        window = [(int(t), float(a)) for t, a in zip(stats.tokens[k, j].tolist(), stats.window_acts[k, j], strict=True)]
        shown = [(t, a) for t, a in window if t >= 0]
        activations.append(
            {
                **TOP_ACTIVATIONS_BIN,
                "bin_max": round(float(stats.values[0, j]), 3),
                "tokens": [tokenizer.decode([t]) for t, _ in shown],
                "values": _rounded(a for _, a in shown),
                "qualifying_token_index": sum(t >= 0 for t, _ in window[:before]),
            }
        )
    centres = (BIN_EDGES[:-1] * BIN_EDGES[1:]).sqrt()  # the log bins' geometric centres
    return {
        "feature_index": j,
        **{name: [] for name in NEURON_FIELDS},
        "neg_str": [tokenizer.decode([int(t)]) for t in effects.suppressed[j]],
        "neg_values": _rounded(effects.suppressed_logits[j]),
        "pos_str": [tokenizer.decode([int(t)]) for t in effects.promoted[j]],
        "pos_values": _rounded(effects.promoted_logits[j]),
        "frac_nonzero": float(stats.fired[j]) / max(stats.rows, 1),
        "freq_hist_data_bar_values": _rounded(centres),
        "freq_hist_data_bar_heights": [int(c) for c in stats.histogram[j]],
        "logits_hist_data_bar_heights": [int(c) for c in effects.histogram[j]],
        "logits_hist_data_bar_values": _rounded(effects.histogram_centres[j]),
        **read,
        "decoder_weights_dist": [],
        "activations": activations,
        "vector": [],
    }


def write_neuronpedia(
    folder: str | Path,
    sae: DMSAEModel,
    tokenizer,
    stats: FeatureStatistics,
    effects: LogitEffects,
    read: dict,
    before: int,
    sae_set: str = "dmsae",
    features_per_batch: int = 128,
) -> Path:
    """Write every latent's record (`feature_record`) into `folder` as `batch-<i>.json` files of
    `features_per_batch` latents, and `run_settings.json` (see the module docstring). `effects` must hold every
    latent, with its logit histogram."""
    if effects.histogram is None or (effects.promoted < 0).all(dim=1).any():
        raise ValueError("the Neuronpedia export needs every latent's logit effects, with their histogram (bins)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = sae.config.dict_size
    batches = range(0, n, features_per_batch)
    for number, first in enumerate(batches):
        features = [
            feature_record(j, tokenizer, stats, effects, read, before)
            for j in range(first, min(first + features_per_batch, n))
        ]
        batch = {
            "model_id": model_id(sae),
            "layer": sae.config.hook_layer,
            "sae_set": sae_set,
            "sae_id_suffix": None,
            "features": features,
        }
        (folder / f"batch-{number}.json").write_text(json.dumps(batch))
    settings = {
        "format": FORMAT,
        "model_id": model_id(sae),
        "layer": sae.config.hook_layer,
        "sae_set": sae_set,
        "hook_name": hook_point(sae.config),
        "features": n,
        "batches": len(batches),
        **read,
    }
    (folder / "run_settings.json").write_text(json.dumps(settings, indent=2))
    return folder
