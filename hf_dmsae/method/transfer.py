"""Transfer (Algorithm 3): new SAEs around a distilled core at several sparsities, against Matryoshka baselines.

For every target L0 `k`: a DMSAE with the core's frozen rows in dense-core mode (`k_noncore` by Eq. 4), one in
sparse-core mode (one global BatchTopK of `k`), and a plain Matryoshka SAE; all on the same slice of the token
stream, budget and seed. Each is evaluated on held-out data (FVU, L0s, dead fraction, CE loss recovered) and, if
asked, with SAEBench's evals (`hf_dmsae.saebench`). Results are recorded in the run's `state.json` after every
model, so re-running resumes (with the same core and settings only); `reporting.transfer.transfer_report` writes them
as `report.md`. Every model is
written as a repo with its model card (`<output_dir>/repos/`) and, with `push_to_hub`, pushed as one set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..data.activations import ActivationArguments
from ..data.language_model import lm_width, weights_digest
from ..data.slices import SliceLayout, TokenSlice
from ..evaluation.held_out import activation_metrics
from ..evaluation.saebench import SAEBenchArguments, headline_metrics
from ..model.core import DMSAECore
from ..model.modeling_dmsae import DMSAEModel
from ..publishing.formats import fit_differences
from ..publishing.hub import (
    check_push_token,
    check_repo_id,
    default_model_repo,
    publish_all,
    repo_folder,
    resolve_folder,
    write_model_repo,
)
from ..run.arguments import SAEArguments, k_noncore_for, new_model
from ..run.data import ActivationSource, open_source
from ..run.state import RunState, arguments_identity
from ..run.trainer import DMSAETrainingArguments
from ..run.training import load_trained_model, train_sae, training_steps
from ..run.variants import PAPER_VARIANTS, VARIANTS, Variant, check_variants, unread_settings
from ..utils.checks import check_ranges
from ..utils.integrity import read_json
from .distillation import control_cores


def model_name(k: int, variant: str) -> str:
    """A transfer model's name: its folder under the run's and its key in the results."""
    return f"k{k}-{variant}"


@dataclass
class TransferArguments:
    """Which core, which sparsities, which variants."""

    core: str = field(metadata={"help": "Distilled core: local folder or Hub repo id org/name[/subfolder][@revision]."})
    ks: list[int] = field(default_factory=lambda: [20, 40, 80, 160, 320, 640], metadata={"help": "Target L0s."})
    variants: list[str] = field(
        default_factory=lambda: list(PAPER_VARIANTS),
        metadata={
            "help": f"Of {VARIANTS}; `random_*`: around random unit rows, as many as the core's; `learned_*`: "
            "around as many latents trained from a fresh initialisation (the learned dense block)."
        },
    )
    control_model: str | None = field(
        default=None,
        metadata={
            "help": "The distillation's last-cycle model (folder or Hub id), whose trained latents outside the core "
            "the `trained_*` variants are built around (as many as the core's, drawn as the distillation's "
            "`random_trained` control of the same seed)."
        },
    )
    control_slice_of: str | None = field(
        default=None,
        metadata={
            "help": "A distillation's folder: the models train on its `control` slice, tokens disjoint from its "
            "attribution split and from every cycle's slice, instead of the start of the training split."
        },
    )
    ce_batches: int = field(default=8, metadata={"help": "Held-out LM batches for CE loss recovered."})
    model_repo: str | None = field(
        default=None,
        metadata={
            "help": "Repo name stem of the trained models: each is <model_repo>-k<k>-<variant> (default: "
            "derived from the LM and layer)."
        },
    )

    def __post_init__(self):
        trained = [v.name for v in check_variants(self.variants) if v.core == "trained"]
        if trained and self.control_model is None:
            raise ValueError(
                f"variants {trained} are built around a distillation's trained latents: give control_model"
            )
        if not self.ks or not self.variants or min(self.ks) < 1:
            raise ValueError(f"ks={self.ks} and variants={self.variants} must be non-empty, with every k ≥ 1")
        check_ranges(self, ce_batches=">= 0")
        if self.model_repo is not None:
            check_repo_id(self.model_repo, "model_repo")


def control_slice_of(distillation_dir: str | Path) -> TokenSlice:
    """The `control` slice a distillation laid out (ended: its controls were trained)."""
    state = read_json(Path(distillation_dir) / "state.json", {"slices": list}, "give a distillation's folder")
    piece = SliceLayout(state["slices"]).get("control")
    if piece is None or piece.end is None:
        raise ValueError(f"{distillation_dir} has no finished control slice: run its distillation with its controls")
    return piece


def check_core_fits(core: DMSAECore, where: str, activations: ActivationArguments) -> None:
    """Refuse a core selected at another width, layer or hook than the run's activations, before any harvesting."""
    layer, hook = core.provenance.get("hook_layer"), core.provenance.get("hook_name")
    differences = fit_differences(core.encoder_rows.shape[1], layer, hook, None, activations, lm_width(activations))
    if differences:
        raise ValueError(f"the core {where} was selected for other activations: {'; '.join(differences)}")


class Transfer:
    """One transfer run; `run()` trains and evaluates every (k, variant) not yet in `results.json`."""

    def __init__(
        self,
        args: TransferArguments,
        sae: SAEArguments,
        activations: ActivationArguments | None,
        training: DMSAETrainingArguments,
        saebench: SAEBenchArguments | None = None,
        *,
        source: ActivationSource | None = None,
    ):
        """`activations` name the LM and text (`RunData`); or `source` gives the activations and the objective that
        evaluates reconstructions (`downstream_metrics`). SAEBench needs an LM."""
        if (activations is None) == (source is None):
            raise ValueError("give either activations (an LM and a text dataset) or a source, not both")
        if source is not None and args.control_slice_of:
            raise ValueError("control_slice_of reads a distillation's LM slice: it needs activations, not a source")
        if source is not None and saebench is not None and saebench.saebench_evals:
            raise ValueError("SAEBench's evals run an LM: they need activations, not a source")
        self.args, self.sae_args, self.activation_args, self.training_args = args, sae, activations, training
        self.saebench_args, self.source = saebench, source
        self.output_dir = Path(training.output_dir)
        self.core = DMSAECore.from_pretrained(resolve_folder(args.core, token=training.hub_token))
        if max(args.ks) > sae.dict_size:
            raise ValueError(f"ks={args.ks} is invalid: every k must be at most dict_size={sae.dict_size}")
        if activations is not None:
            check_core_fits(self.core, args.core, activations)
        check_push_token(training.push_to_hub, training.hub_token)
        if activations is not None:  # the budget holds the steps asked for, before the run's folder records anything
            training_steps(activations.num_tokens, training)
        self.model_repo = check_repo_id(
            args.model_repo
            or training.hub_model_id
            or (default_model_repo(activations) if source is None else source.default_repo),
            "model_repo",
        )
        identity = arguments_identity(  # each (k, variant) is a model of its own: a run may be given more
            *(a for a in (args, sae, activations, training) if a is not None),
            exclude=(
                "core",
                "ce_batches",
                "model_repo",
                "ks",
                "variants",
                "SAEArguments.sparsity",  # each variant names its own mode
                *(f"SAEArguments.{name}" for name in unread_settings(args.variants)),
            ),
        )
        identity["inputs.core"] = self.core.digest()
        self.control_model = None
        if args.control_model is not None:
            self.control_model = DMSAEModel.from_pretrained(
                resolve_folder(args.control_model, token=training.hub_token)
            )
            identity["inputs.control_model"] = weights_digest(self.control_model)
        self.control_slice = control_slice_of(args.control_slice_of) if args.control_slice_of else None
        if self.control_slice is not None:
            identity["inputs.control_slice"] = self.control_slice.to_dict()
        self.state = RunState(self.output_dir, "transfer", identity, writer=training.process_index == 0)
        self.results: dict = self.state.record("results")
        self.state.data["core"] = {"source": args.core, "size": len(self.core)}  # for the report
        self.state.save()

    @cached_property
    def data(self) -> ActivationSource:
        """The activations: the LM's, loaded on first use, or the given source."""
        return open_source(self.source, self.activation_args, self.training_args, self.state)

    @cached_property
    def saebench(self):
        """The SAEBench runner (results under `<output_dir>/saebench/`), or None if no SAEBench eval is asked."""
        if self.saebench_args is None or not self.saebench_args.saebench_evals:
            return None
        from ..evaluation.saebench import SAEBenchRunner

        return SAEBenchRunner(self.saebench_args, self.activation_args, self.output_dir / "saebench")

    @property
    def models(self) -> dict[str, tuple[int, str]]:
        """Every model's name (`k<k>-<variant>`, its folder under the run's) and its (k, variant), in training order."""
        return {model_name(k, variant): (k, variant) for k in self.args.ks for variant in self.args.variants}

    def new_model(self, k: int, variant: str) -> DMSAEModel:
        """The `variant` model at L0 `k`; a transfer sweeps `k`, so `k_noncore` always follows it (Eq. 4 at the core
        size, by `k_noncore_for`), whatever value was given for one run. A random core's rows are the distillation
        control's of the run's seed, a trained core's its `random_trained` control's (`control_cores`)."""
        built = Variant.parse(variant)
        core = self.core if built.core == "distilled" else None
        if built.core in ("random", "trained"):
            d_in, seed = self.core.encoder_rows.shape[1], self.training_args.seed
            controls = control_cores(self.core, d_in, seed, self.control_model if built.core == "trained" else None)
            core = controls["random_init" if built.core == "random" else "random_trained"]
        learned = len(self.core) if built.core == "learned" else 0
        sae = dataclasses.replace(self.sae_args, k=k, k_noncore=None, sparsity=built.mode)
        sae = dataclasses.replace(sae, k_noncore=k_noncore_for(sae, reference_core_size=len(core or []) + learned))
        return new_model(sae, self.data, core, seed=self.training_args.seed, learned_core=learned)

    def evaluate(self, model: DMSAEModel) -> dict[str, float]:
        """Held-out metrics and the objective's (an LM: CE loss recovered) (main process; {} elsewhere)."""
        if self.training_args.process_index != 0:
            return {}
        rows = self.data.eval_batches(self.training_args.per_device_eval_batch_size)
        return {**activation_metrics(model, rows), **self.data.downstream_metrics(model, self.args.ce_batches)}

    def run(self) -> dict:
        """Train, evaluate, run SAEBench on and publish every model not yet done; the results."""
        self.train()
        self.run_saebench()
        self.publish()
        return self.results

    def train(self, after_each: Callable[[str, dict], None] | None = None, skip: Collection[str] = ()) -> dict:
        """Train and evaluate every (k, variant) not yet in the results nor in `skip` (models recorded elsewhere),
        recording each (and handing its name and record to `after_each`) as it finishes; the results."""
        done = set(self.results) | set(skip)
        todo = [(name, k, variant) for name, (k, variant) in self.models.items() if name not in done]
        piece = self._training_slice() if todo else None  # a finished run opens no LM
        for name, k, variant in todo:
            model = self.new_model(k, variant)
            args = dataclasses.replace(self.training_args, output_dir=str(self.output_dir / name), push_to_hub=False)
            convergence = train_sae(model, self.data, piece, args).convergence
            metrics = self.evaluate(model.to(self.training_args.device))
            self.results[name] = {"k": k, "variant": variant, **metrics, "convergence": convergence}
            self.state.save()
            if after_each is not None:
                after_each(name, self.results[name])
        return self.results

    def _training_slice(self):
        """The slice every model trains on: the start of the training split, or the distillation's control slice."""
        if self.control_slice is None:
            return self.data.training_slice("train")
        if self.control_slice.rows != self.activation_args.num_tokens:
            raise ValueError(
                f"{self.args.control_slice_of}'s control slice holds {self.control_slice.rows} rows a reader; "
                f"num_tokens={self.activation_args.num_tokens} asks for another budget"
            )
        return self.data.adopted_slice(self.control_slice)

    def publish(self) -> None:
        """Write every trained model as a repo with its card, named `<model_repo>-<name>`, and push them as one set
        with `push_to_hub` (main process)."""
        if self.training_args.process_index != 0:
            return
        items = []
        for name, result in self.results.items():
            repo = f"{self.model_repo}-{name}"
            model = load_trained_model(self.output_dir / name)
            folder = write_model_repo(
                model,
                repo_folder(self.output_dir, repo),
                repo,
                metrics=result,
                datasets=[self.data.dataset_name],
                convergence=result.get("convergence"),
                activations=self.activation_args,
            )
            items.append((folder, repo))
        publish_all(items, push=self.training_args.push_to_hub, token=self.training_args.hub_token)

    def run_saebench(self, after_each: Callable[[str, dict], None] | None = None) -> None:
        """SAEBench, if asked, on every trained model that lacks its results (main process, after all training, so
        no other process waits in a collective meanwhile), recording each (and handing it to `after_each`)."""
        if self.saebench is None or self.training_args.process_index != 0:
            return
        for name, result in self.results.items():
            if "saebench" not in result:
                result["saebench"] = self.saebench.run(name, load_trained_model(self.output_dir / name))
                result |= headline_metrics(result["saebench"])
                self.state.save()
                if after_each is not None:
                    after_each(name, result)
