"""SAEBench's evals on DMSAEs: which evals, their settings, and the runner (the adapter is `saebench_sae`).

The evals that need nothing beyond the LM and the installed packages (core, absorption, sparse probing on
sae-probes' shipped datasets, meta_structure) always run, but absorption on the CPU only when asked for (it takes
hours a model there); the others run when their data or keys are reachable. What does not run is recorded as
skipped with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.activations import ActivationArguments
from ..model.modeling_dmsae import DMSAEModel
from ..utils.checks import check_ranges

logger = logging.getLogger(__name__)

# SAEBench's module (`sae_bench.evals.<module>`) and config class of every eval this runner knows.
EVAL_MODULES = {
    "core": ("core", "CoreEvalConfig"),
    "absorption": ("absorption", "AbsorptionEvalConfig"),
    "sparse_probing_sae_probes": ("sparse_probing_sae_probes", "SparseProbingSaeProbesEvalConfig"),
    "meta_structure": ("meta_structure", "MetaStructureEvalConfig"),
    "scr": ("scr_and_tpp", "ScrAndTppEvalConfig"),
    "tpp": ("scr_and_tpp", "ScrAndTppEvalConfig"),
    "sparse_probing": ("sparse_probing", "SparseProbingEvalConfig"),
    "ravel": ("ravel", "RAVELEvalConfig"),
    "unlearning": ("unlearning", "UnlearningEvalConfig"),
    "autointerp": ("autointerp", "AutoInterpEvalConfig"),
}
# Measured on 2 CPU cores (docs/results.md): why absorption is skipped on the CPU unless asked for.
ABSORPTION_CPU_COST = (
    "its feature-splitting search took 589 steps of ~21 s for one SAE on SmolLM2-135M on 2 CPU cores, about 3.4 h "
    "a model"
)
OFFLINE_EVALS = ("core", "absorption", "sparse_probing_sae_probes", "meta_structure")
ONLINE_EVALS = tuple(name for name in EVAL_MODULES if name not in OFFLINE_EVALS)
# Short sae-probes datasets of different kinds (sport, geography, time, causality, headlines, spam).
PROBE_DATASETS = [
    "131_temp_cat_Typical Time",
    "117_us_state_FL",
    "133_context_type_Causality",
    "24_headline_isiran",
    "96_spam_is",
    "154_athlete_sport_football",
]
# One number per eval for the report's table: (eval, key in the flattened `eval_result_metrics`, column name).
HEADLINE_METRICS = (
    ("core", "model_performance_preservation.ce_loss_score", "sb_ce_loss_score"),
    ("core", "model_behavior_preservation.kl_div_score", "sb_kl_div_score"),
    ("core", "reconstruction_quality.explained_variance", "sb_explained_variance"),
    ("absorption", "mean.mean_absorption_fraction_score", "sb_absorption"),
    ("sparse_probing_sae_probes", "sae.sae_top_1_test_accuracy", "sb_probe_top1_acc"),
    ("sparse_probing_sae_probes", "sae.sae_top_5_test_accuracy", "sb_probe_top5_acc"),
    ("meta_structure", "meta_structure.decoder_fraction_variance_explained", "sb_meta_fve"),
)


@dataclass
class SAEBenchArguments:
    """Which SAEBench evals to run and how much data they see (defaults sized for a CPU run on a small LM)."""

    saebench_evals: list[str] = field(
        default_factory=lambda: list(OFFLINE_EVALS),
        metadata={
            "help": f"Of {tuple(EVAL_MODULES)} (none: no SAEBench); online ones ({ONLINE_EVALS}) are skipped "
            "when their data or key is unreachable."
        },
    )
    saebench_device: str = field(default="cpu", metadata={"help": "Device the evals run on."})
    saebench_llm_dtype: str = field(default="float32", metadata={"help": "dtype of the LM under TransformerLens."})
    core_batches: int = field(default=8, metadata={"help": "Batches of prompts for core's KL and CE metrics."})
    core_batch_prompts: int = field(default=8, metadata={"help": "Prompts per core batch."})
    core_variance_batches: int = field(default=4, metadata={"help": "Batches for core's sparsity and variance."})
    probe_datasets: list[str] = field(
        default_factory=lambda: list(PROBE_DATASETS), metadata={"help": "sae-probes datasets for sparse probing."}
    )
    meta_structure_steps: int = field(default=1500, metadata={"help": "Training steps of meta_structure's meta-SAE."})
    absorption_on_cpu: bool = field(
        default=False,
        metadata={
            "help": "Run absorption even when saebench_device is the CPU, where it is recorded as skipped otherwise: "
            f"{ABSORPTION_CPU_COST}."
        },
    )

    def __post_init__(self):
        check_ranges(
            self,
            core_batches=">= 1",
            core_batch_prompts=">= 1",
            core_variance_batches=">= 1",
            meta_structure_steps=">= 1",
        )
        unknown = set(self.saebench_evals) - set(EVAL_MODULES)
        if unknown:
            raise ValueError(
                f"saebench_evals={self.saebench_evals} is invalid: {sorted(unknown)} are not SAEBench "
                f"evals this runner knows ({tuple(EVAL_MODULES)})"
            )


def _hub_datasets_missing(repo_ids: list[str]) -> str | None:
    from huggingface_hub import HfApi

    for repo_id in repo_ids:
        try:
            HfApi().dataset_info(repo_id, timeout=20)
        except Exception as error:  # offline, gated, moved: all mean the eval cannot run here
            return f"Hub dataset {repo_id} is unreachable ({type(error).__name__}: {str(error).splitlines()[0]})"
    return None


def unavailable_reason(eval_name: str, config, args: SAEBenchArguments) -> str | None:
    """Why `eval_name` cannot or should not run here, or None if its data and keys are reachable (and its cost on
    the chosen device is bearable or asked for)."""
    if eval_name == "absorption" and args.saebench_device == "cpu" and not args.absorption_on_cpu:
        return (
            f"absorption is not run on the CPU: {ABSORPTION_CPU_COST}; run it on a GPU (--saebench_device cuda) or "
            "ask for it with --absorption_on_cpu true"
        )
    if eval_name == "autointerp":
        return None if os.environ.get("OPENAI_API_KEY") else "autointerp needs an OpenAI API key (OPENAI_API_KEY)"
    if eval_name == "unlearning":
        corpus = Path("sae_bench/evals/unlearning/data/bio-forget-corpus.jsonl")
        if not corpus.is_file():
            return f"unlearning needs WMDP's gated bio forget corpus at ./{corpus} (request it from the WMDP authors)"
        return _hub_datasets_missing(["cais/wmdp", "cais/mmlu"])
    if eval_name == "ravel":
        return _hub_datasets_missing(["adamkarvonen/ravel_prompts"])
    if eval_name in ("scr", "tpp", "sparse_probing"):
        return _hub_datasets_missing(list(config.dataset_names))
    return None


class _Tee(io.TextIOBase):
    """Writes to several streams (SAEBench's prints reach the console and are kept)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`, keeping numbers only."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


class SAEBenchRunner:
    """Runs the chosen SAEBench evals on DMSAEs; each result is SAEBench's own JSON under
    `<output_dir>/<eval>/`, so re-running skips what is done (SAEBench's `force_rerun=False`)."""

    def __init__(self, args: SAEBenchArguments, activations: ActivationArguments, output_dir: str | Path):
        from .saebench_sae import transformer_lens_name

        self.args, self.activation_args = args, activations
        self.output_dir = Path(output_dir).resolve()
        self.model_name = transformer_lens_name(activations.model_name_or_path)
        self.device = args.saebench_device
        self.dtype = getattr(torch, args.saebench_llm_dtype)
        self._lm = None

    @property
    def lm(self):
        """The LM as a HookedTransformer, loaded once by the same call SAEBench's evals make."""
        if self._lm is None:
            from transformer_lens import HookedTransformer

            self._lm = HookedTransformer.from_pretrained_no_processing(
                self.model_name, device=self.device, dtype=self.dtype
            )
        return self._lm

    def run(self, name: str, sae: DMSAEModel) -> dict[str, dict]:
        """`{eval: {"metrics": {...}}, {"skipped": reason} or {"failed": what SAEBench raised}}` for the SAE called
        `name` (unique per output_dir)."""
        from .saebench_sae import SAEBenchSAE

        adapter = SAEBenchSAE(sae, self.model_name, self.device, self.dtype)
        results = {}
        with contextlib.chdir(self._folder("artifacts")):  # SAEBench writes artifacts under the working directory
            for eval_name in self.args.saebench_evals:
                results[eval_name] = self._run_one(eval_name, name, adapter)
        return results

    def _folder(self, *parts: str) -> Path:
        folder = self.output_dir.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _run_one(self, eval_name: str, name: str, adapter) -> dict:
        from sae_bench.sae_bench_utils.general_utils import get_results_filepath

        output = self.output_dir / eval_name
        path = Path(get_results_filepath(str(output), name, "custom_sae"))
        if not path.is_file():
            config = self._config(eval_name)
            reason = unavailable_reason(eval_name, config, self.args)
            if reason:
                logger.warning("SAEBench %s skipped: %s", eval_name, reason)
                return {"skipped": reason}
            output.mkdir(parents=True, exist_ok=True)
            logger.info("SAEBench %s on %s", eval_name, name)
            torch.manual_seed(0)
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
                    getattr(self, f"_run_{eval_name}", self._run_generic)(eval_name, config, name, adapter, output)
            except Exception as error:  # SAEBench's code failed: keep the other evals and the trained models
                frame = traceback.extract_tb(error.__traceback__)[-1]
                where = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"
                logger.exception("SAEBench %s failed on %s", eval_name, name)
                return {"failed": f"SAEBench's {eval_name} eval failed in {where}: {type(error).__name__}: {error}"}
            if not path.is_file():  # SAEBench declined: its last words say why
                lines = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
                reason = lines[-1] if lines else "no reason printed"
                return {"skipped": f"SAEBench's {eval_name} eval wrote no result: {reason}"}
        if not path.is_file():
            return {"skipped": f"SAEBench's {eval_name} eval wrote no result"}
        return {"metrics": flatten(json.loads(path.read_text())["eval_result_metrics"])}

    def _config(self, eval_name: str):
        a = self.args
        common = {"model_name": self.model_name}
        if eval_name == "core":
            from sae_bench.evals.core.eval_config import CoreEvalConfig

            return CoreEvalConfig(
                **common,
                batch_size_prompts=a.core_batch_prompts,
                llm_dtype=a.saebench_llm_dtype,
                n_eval_reconstruction_batches=a.core_batches,
                compute_kl=True,
                compute_ce_loss=True,
                n_eval_sparsity_variance_batches=a.core_variance_batches,
                compute_l2_norms=True,
                compute_sparsity_metrics=True,
                compute_variance_metrics=True,
                compute_featurewise_density_statistics=True,
                compute_featurewise_weight_based_metrics=True,
                exclude_special_tokens_from_reconstruction=True,
                context_size=self.activation_args.context_length,
                dataset=self.activation_args.dataset_name_or_path,
            )
        if eval_name == "absorption":
            from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

            return AbsorptionEvalConfig(**common, llm_dtype=a.saebench_llm_dtype)
        if eval_name == "sparse_probing_sae_probes":
            from sae_bench.evals.sparse_probing_sae_probes.eval_config import SparseProbingSaeProbesEvalConfig
            from sae_probes.generate_sae_activations import DATASET_SIZES

            unknown = sorted(set(a.probe_datasets) - set(DATASET_SIZES))
            if unknown:
                raise ValueError(
                    f"probe_datasets {unknown} are not sae-probes datasets (e.g. {sorted(DATASET_SIZES)[:3]})"
                )

            return SparseProbingSaeProbesEvalConfig(
                **common,
                dataset_names=a.probe_datasets,
                include_llm_baseline=True,
                results_path=str(self._folder("artifacts", "sae_probes")),
                model_cache_path=str(self._folder("artifacts", "sae_probes_model_activations")),
            )
        if eval_name == "meta_structure":
            from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig

            return MetaStructureEvalConfig(train_steps=a.meta_structure_steps, autocast=self.device != "cpu")
        module, config_class = EVAL_MODULES[eval_name]
        config = getattr(importlib.import_module(f"sae_bench.evals.{module}.eval_config"), config_class)(**common)
        if eval_name in ("scr", "tpp"):
            config.perform_scr = eval_name == "scr"
        return config

    def _run_core(self, eval_name, config, name, adapter, output: Path) -> None:
        """SAEBench's core metrics over our text source (its `multiple_evals` only takes a dataset by name)."""
        from sae_bench.evals.core import main as core
        from sae_bench.sae_bench_utils import get_eval_uuid, get_sae_bench_version, get_sae_lens_version
        from sae_bench.sae_bench_utils.general_utils import get_results_filepath, load_and_format_sae
        from sae_lens import ActivationsStore

        _, sae, _ = load_and_format_sae(name, adapter, self.device)
        source = self.activation_args.text_source()
        split = self.activation_args.eval_split
        if split not in source.splits():  # no held-out split: the stream's start is the run's evaluation slice
            split = self.activation_args.dataset_split
        texts = source.load(split)
        if self.activation_args.text_column != "text":
            texts = texts.rename_column(self.activation_args.text_column, "text")
        store = ActivationsStore.from_sae(
            self.lm,
            sae,
            dataset=texts,
            context_size=config.context_size,
            store_batch_size_prompts=config.batch_size_prompts,
            device=self.device,
        )
        tokenizer = self.lm.tokenizer
        metrics, features = core.run_evals(
            sae,
            store,
            self.lm,
            config,
            verbose=False,
            ignore_tokens={tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id},
        )
        metrics["misc_metrics"] = core.calculate_misc_metrics(features)
        result = core.nested_dict()
        result |= {
            "unique_id": f"{name}_custom_sae",
            "sae_set": name,
            "sae_id": "custom_sae",
            "eval_cfg": config,
            "metrics": metrics,
            "feature_metrics": features,
        }
        core.save_single_eval_result(
            core.replace_nans_with_negative_one(result),
            get_eval_uuid(),
            get_sae_lens_version(),
            get_sae_bench_version(),
            get_results_filepath(str(output), name, "custom_sae"),
            sae,
        )

    def _run_meta_structure(self, eval_name, config, name, adapter, output: Path) -> None:
        from sae_bench.evals.meta_structure import main as meta_structure
        from sae_bench.sae_bench_utils.general_utils import get_results_filepath

        result = meta_structure.run_eval_single_sae(name, "custom_sae", adapter, config, self.device)
        result.to_json_file(get_results_filepath(str(output), name, "custom_sae"), indent=2)

    def _run_generic(self, eval_name, config, name, adapter, output: Path) -> None:
        """Evals whose `run_eval(config, selected_saes, device, output_path)` loads the LM by name itself."""
        module, _ = EVAL_MODULES[eval_name]
        run_eval = importlib.import_module(f"sae_bench.evals.{module}.main").run_eval
        extra = {"api_key": os.environ["OPENAI_API_KEY"]} if eval_name == "autointerp" else {}
        run_eval(config=config, selected_saes=[(name, adapter)], device=self.device, output_path=str(output), **extra)


def headline_metrics(results: dict[str, dict]) -> dict[str, float]:
    """The report's SAEBench columns from `SAEBenchRunner.run`'s output (missing ones left out)."""
    row = {}
    for eval_name, key, column in HEADLINE_METRICS:
        value = results.get(eval_name, {}).get("metrics", {}).get(key)
        if value is not None:
            row[column] = value
    return row
