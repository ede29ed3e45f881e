"""The convergence sweep (`make convergence`): which budget makes the embedded default's SAEs train
(docs/results.md, "Convergence").

Every setting of the sweep file (a learning rate, batch size, passes over a cached slice, the dead-latent window,
the dead latents' loss and its `aux_k` / `aux_coef`, the slice's size) trains the Matryoshka SAE and the dense-core
DMSAE at the screening k on seed 0. The settings whose every model converged (`evaluation.convergence.CRITERIA`)
are candidates; the `candidates` cheapest (in training tokens) train at every k and seed, and once more at twice
their passes. The chosen setting is the cheapest candidate whose every model converged and whose doubled budget
improves held-out FVU by less than `TWICE_GAIN`: `results.json`'s `"chosen"`. The share of latents the two seeds'
models share is recorded beside.

The dense-core models are built around random unit rows as many as the demo's distilled core (`core_size`), the
same rows for every seed: the sweep decides the budget a distillation then uses, so its core cannot come from a
distillation at a budget not yet decided, and a dense core's frozen rows train the same way whatever they are.

`results.json` is saved after every model and continued from; settings may be added to a finished sweep.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.activations import ActivationArguments
from ..evaluation.consistency import matched_latents
from ..evaluation.convergence import judged
from ..evaluation.held_out import activation_metrics
from ..method.distillation import random_core
from ..model.core import DMSAECore
from ..run.arguments import SAEArguments, new_model
from ..run.convergence import silent_over_a_pass
from ..run.data import RunData
from ..run.results import CONVERGENCE_RESULTS, StudyResults
from ..run.state import RunState, arguments_identity
from ..run.trainer import DMSAETrainingArguments
from ..run.training import load_trained_model, train_sae
from ..run.variants import Variant
from ..utils.integrity import read_json
from .arguments import StudyArguments, study_identity

logger = logging.getLogger(__name__)

TWICE_GAIN = 0.03
"""The chosen setting's held-out FVU improves by less than this (relative) when its passes are doubled."""
SAE_SETTINGS = ("dead_tokens_threshold", "dead_latent_loss", "aux_k", "aux_coef")
TRAINING_SETTINGS = (
    "learning_rate",
    "per_device_train_batch_size",
    "num_train_epochs",
    "warmup_steps",
    "decay_fraction",
    "resample_dead_every",
    "adam_beta1",
)
SETTINGS = (*SAE_SETTINGS, *TRAINING_SETTINGS, "train_tokens")
"""What a setting of the sweep file may set (`train_tokens`: the training slice's size)."""


@dataclass
class ConvergenceArguments:
    """The sweep file, how many candidates are confirmed, at which k they are screened, the dense core's size."""

    sweep: str = field(
        default="configs/convergence.json",
        metadata={"help": f'JSON list of settings, each {{"name": …, and any of {SETTINGS}}}, cheapest first or not.'},
    )
    study_dir: str = field(default="runs/convergence", metadata={"help": "Where the sweep's runs go."})
    screen_k: int = field(default=64, metadata={"help": "The k every setting is screened at (seed 0)."})
    candidates: int = field(default=2, metadata={"help": "Settings that passed the screen confirmed at every k, seed."})
    core_size: int = field(default=121, metadata={"help": "Random unit rows of the dense-core models' core."})

    def __post_init__(self):
        if self.screen_k < 1 or self.candidates < 1 or self.core_size < 1:
            raise ValueError("screen_k, candidates and core_size must be at least 1")

    def settings(self) -> dict[str, dict]:
        """The sweep file's settings by name, each checked."""
        listed = read_json(self.sweep, None, "restore it from its commit")
        if not isinstance(listed, list):
            raise ValueError(f"{self.sweep} holds no list of settings")
        settings = {}
        for setting in listed:
            name = setting.get("name") if isinstance(setting, dict) else None
            if not isinstance(name, str) or name in settings:
                raise ValueError(f"{self.sweep}: every setting needs a name of its own, got {setting!r}")
            if unknown := set(setting) - {"name", *SETTINGS}:
                raise ValueError(f"{self.sweep}: setting {name!r} sets {sorted(unknown)}, not among {SETTINGS}")
            settings[name] = {k: v for k, v in setting.items() if k != "name"}
        return settings


def doubled(overrides: dict) -> dict:
    """A setting at twice its passes."""
    return {**overrides, "num_train_epochs": 2 * overrides.get("num_train_epochs", 1)}


class ConvergenceSweep:
    """The sweep; `run()` trains what `results.json` lacks, in the order screen, confirm, twice, and chooses."""

    def __init__(
        self,
        args: ConvergenceArguments,
        study: StudyArguments,
        sae: SAEArguments,
        activations: ActivationArguments,
        training: DMSAETrainingArguments,
    ):
        if args.screen_k not in study.ks:
            raise ValueError(f"screen_k={args.screen_k} is invalid: it must be one of ks={study.ks}")
        if len(study.seeds) < 2:
            raise ValueError(f"seeds={study.seeds} is invalid: latents are matched across two seeds")
        self.variants = {v.name: v for v in map(Variant.parse, study.variants)}
        if unknown := [v.name for v in self.variants.values() if v.core not in ("none", "random")]:
            raise ValueError(f"variants {unknown} are not swept: the Matryoshka SAE and random-core DMSAEs are")
        if activations.activation_cache is None:
            raise ValueError("the sweep reads its slices many times: give --activation_cache")
        self.args, self.study, self.sae_args, self.activation_args = args, study, sae, activations
        self.training_args, self.settings = training, args.settings()
        self.study_dir = Path(args.study_dir)
        self.results_path = Path(study.results_dir or args.study_dir) / "results.json"
        self._data = None

    # -- what it trains ---------------------------------------------------------------------------------------------
    @property
    def data(self) -> RunData:
        """The LM, its statistics and the sweep's slices (opened at the first model trained)."""
        if self._data is None:
            identity = arguments_identity(self.activation_args) | {"study": "convergence"}
            state = RunState(self.study_dir, "convergence", identity, writer=self.training_args.process_index == 0)
            self._data = RunData(self.activation_args, self.training_args, state)
        return self._data

    def cost(self, overrides: dict) -> int:
        """Training tokens of a setting: its slice times its passes."""
        return overrides.get("train_tokens", self.activation_args.num_tokens) * overrides.get("num_train_epochs", 1)

    def core(self) -> DMSAECore:
        """The dense-core models' core: `core_size` random unit rows, the same for every seed."""
        size, d_in = self.args.core_size, self.data.d_in
        empty = torch.zeros(0)
        like = DMSAECore(torch.zeros(size, d_in), [str(i) for i in range(size)], torch.zeros(size), [], empty, empty)
        return random_core(like, d_in, torch.Generator().manual_seed(0))

    def train(self, name: str, overrides: dict, variant: str, k: int, seed: int) -> dict:
        """One model of the sweep, trained (or resumed) and measured."""
        data, parsed = self.data, self.variants[variant]
        sae = dataclasses.replace(
            self.sae_args, k=k, sparsity=parsed.mode, **{s: overrides[s] for s in SAE_SETTINGS if s in overrides}
        )
        tokens = overrides.get("train_tokens", self.activation_args.num_tokens)
        piece = data.training_slice(f"train-{tokens}", tokens)
        folder = self.study_dir / name / f"k{k}-{variant}" / f"seed{seed}"
        training = dataclasses.replace(
            self.training_args,
            output_dir=str(folder),
            seed=seed,
            push_to_hub=False,
            **{s: overrides[s] for s in TRAINING_SETTINGS if s in overrides},
        )
        model = new_model(sae, data, self.core() if parsed.core == "random" else None, seed=seed)
        started = time.perf_counter()
        trainer = train_sae(model, data, piece, training)
        metrics = activation_metrics(model, data.eval_batches(training.per_device_eval_batch_size))
        metrics |= data.downstream_metrics(model, self.study.ce_batches)
        return {
            "setting": name,
            "overrides": overrides,
            "variant": variant,
            "k": k,
            "seed": seed,
            "seconds": round(time.perf_counter() - started, 1),
            **{key.removeprefix("eval_"): value for key, value in metrics.items()},
            "convergence": trainer.convergence,
        }

    # -- the sweep --------------------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What every model depends on but its setting (which its record holds); settings may be added."""
        given = (self.sae_args, self.activation_args, self.training_args)
        identity = arguments_identity(*given, exclude=("DMSAETrainingArguments.seed", "results_dir"))
        identity |= {"study": study_identity(self.study), "core_size": self.args.core_size}
        return json.loads(json.dumps(identity, default=str))

    def run(self) -> dict:
        with StudyResults(self.results_path, self.identity(), CONVERGENCE_RESULTS) as self.store:
            return self._run(self.store.data)

    def _model(self, results: dict, name: str, overrides: dict, variant: str, k: int, seed: int) -> dict:
        key = f"{name}/k{k}-{variant}/seed{seed}"
        models = results.setdefault("models", {})
        if key in models and models[key]["overrides"] != overrides:
            raise ValueError(
                f"{self.results_path}: {key} was trained at {models[key]['overrides']}, the sweep file now says "
                f"{overrides}: give the changed setting a name of its own"
            )
        if key not in models:
            logger.info("Convergence sweep: %s (%s)", key, overrides)
            models[key] = self.train(name, overrides, variant, k, seed)
            self.store.save()
        return models[key]

    def _recounted(self, results: dict) -> None:
        """Records made before dead latents were counted in inference mode over a pass (`DEAD_OVER_A_PASS`) get
        that count from their saved model and are judged again; one whose model is gone is trained again."""
        models = results.get("models", {})
        for key, record in list(models.items()):
            if "in_inference" in record["convergence"]["dead_fraction_by"]:
                continue
            folder = (
                self.study_dir / record["setting"] / f"k{record['k']}-{record['variant']}" / f"seed{record['seed']}"
            )
            if not (folder / "model.safetensors").is_file():
                logger.warning("%s: its model is gone (%s), so it is trained again", key, folder)
                del models[key]
                continue
            tokens = record["overrides"].get("train_tokens", self.activation_args.num_tokens)
            slice_rows = self.data.training_data(
                self.data.training_slice(f"train-{tokens}", tokens), self.training_args
            )
            silent = silent_over_a_pass(load_trained_model(folder), slice_rows)
            convergence = record["convergence"]
            record["convergence"] = judged(
                {**convergence, "dead_fraction_by": {**convergence["dead_fraction_by"], "in_inference": silent}}
            )
            logger.info("Convergence sweep: %s recounted, %.3f silent over a pass", key, silent)
            self.store.save()

    def _run(self, results: dict) -> dict:
        screen, first = self.args.screen_k, self.study.seeds[0]
        self._recounted(results)
        results["screen_k"] = screen
        ordered = sorted(self.settings.items(), key=lambda item: self.cost(item[1]))
        passed = []
        for name, overrides in ordered:
            screened = [self._model(results, name, overrides, v, screen, first) for v in self.variants]
            if all(m["convergence"]["converged"] for m in screened):
                passed.append(name)
        results["candidates"] = passed[: self.args.candidates]
        for name in results["candidates"]:
            overrides = self.settings[name]
            for variant in self.variants:
                for k in self.study.ks:
                    pair = [self._model(results, name, overrides, variant, k, seed) for seed in self.study.seeds[:2]]
                    folders = [self.study_dir / name / f"k{k}-{variant}" / f"seed{m['seed']}" for m in pair]
                    results.setdefault("matched", {})[f"{name}/k{k}-{variant}"] = self.matched(folders)
                twice = self._model(results, f"{name}-twice", doubled(overrides), variant, screen, first)
                once = results["models"][f"{name}/k{screen}-{variant}/seed{first}"]
                gain = (once["fvu"] - twice["fvu"]) / once["fvu"]
                results.setdefault("twice", {})[f"{name}/k{screen}-{variant}"] = {"fvu_gain": gain}
                self.store.save()
        results["chosen"] = self.chosen(results)
        self.store.save()
        return results

    def matched(self, folders: list[Path]) -> dict:
        """The share of the first seed's latents with a decoder-cosine match in the second's (core, non-core)."""
        first, second = (load_trained_model(folder) for folder in folders)
        return matched_latents(first, second, self.study.latent_match_cos)

    def chosen(self, results: dict) -> dict:
        """The cheapest candidate whose every model converged and gains less than `TWICE_GAIN` from twice its
        passes; or why none is."""
        for name in results["candidates"]:
            models = {key: m for key, m in results["models"].items() if m["setting"] == name}
            twice = {key: t for key, t in results.get("twice", {}).items() if key.startswith(f"{name}/")}
            if all(m["convergence"]["converged"] for m in models.values()) and all(
                t["fvu_gain"] < TWICE_GAIN for t in twice.values()
            ):
                return {
                    "setting": name,
                    "overrides": self.settings[name],
                    "tokens": self.cost(self.settings[name]),
                    "convergence": {key: m["convergence"] for key, m in models.items()},
                }
        return {
            "setting": None,
            "why": "no candidate converged at every k and seed with less than "
            f"{TWICE_GAIN:.0%} to gain from twice its passes",
        }
