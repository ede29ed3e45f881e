"""The distillation cycles (Algorithm 1), the distilled core (Eq. 8) and the random-core control (Fig. 3).

Cycle 0 is a plain Matryoshka SAE (a dictionary_learning checkpoint, or trained here); cycle t ≥ 1 is a new DMSAE
whose frozen core rows are the encoder rows selected in cycle t−1, everything else reinitialised. Every cycle is
scored by attribution and selects the next core. The distilled core is `C^(T) ∩ C^(T−1)` by latent id.

The run lives in one output folder: `cycle{t}/` (the Trainer's output: checkpoints, the model, `core/`),
`repos/` (each artifact as a complete local repo), `state.json` (what is done, written after every step that
matters) and `report.md`. Re-running the same command resumes where a crash stopped it: finished cycles are read
back, an interrupted training continues from its last checkpoint, and every cycle is seeded by its index, so the
cores come out the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cached_property
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import set_seed

from . import figures
from .activations import ActivationArguments
from .attribution import AttributionArguments, AttributionCallback, select_core
from .core import DMSAECore
from .formats import load_dictionary_learning
from .hub import core_repo_name, publish, write_core_repo, write_model_repo
from .modeling_dmsae import DMSAEModel
from .runs import ActivationData, SAEArguments, prepare_activations, sae_config, train_sae, write_json_atomically
from .trainer import DMSAETrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class DistillationArguments:
    """The train-and-select cycles."""

    num_cycles: int = field(default=2, metadata={"help": "Cycles T after cycle 0; the distilled core needs T ≥ 1."})
    cycle0_checkpoint: str | None = field(
        default=None, metadata={"help": "dictionary_learning Matryoshka checkpoint folder used as cycle 0."}
    )
    random_core_control: bool = field(
        default=False,
        metadata={"help": "Also train the distilled core and a random core of the same size side by side (Fig. 3)."},
    )
    model_repo: str | None = field(
        default=None, metadata={"help": "Repo name of the run's model, e.g. org/dmsae-gemma2-2b-l12 (default: derived)."}
    )

    def __post_init__(self):
        if self.num_cycles < 1:
            raise ValueError(f"num_cycles={self.num_cycles} is invalid: the distilled core needs at least 1 cycle")


class RunState:
    """`state.json`: the arguments' fingerprint and what each step produced; rewritten atomically."""

    def __init__(self, path: Path, fingerprint: str, writer: bool):
        self.path, self.writer = path, writer
        self.data = {"fingerprint": fingerprint, "cycles": {}, "distilled": None, "control": None}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved["fingerprint"] != fingerprint:
                raise ValueError(
                    f"{path.parent} holds a distillation run with other arguments; use another output_dir or delete it"
                )
            self.data = saved

    def cycle(self, t: int) -> dict:
        return self.data["cycles"].setdefault(str(t), {})

    def save(self) -> None:
        if not self.writer:
            return
        write_json_atomically(self.path, self.data)


# The training arguments that change what a cycle learns (the rest: logging, paths, pushing, process layout).
_TRAINING_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                    "num_train_epochs", "seed", "weight_decay", "lr_scheduler_type", "warmup_steps", "decay_fraction",
                    "bf16", "max_grad_norm", "adam_beta1", "adam_beta2", "init_decoder_bias_rows")  # fmt: skip


def _fingerprint(distillation, sae, activations, attribution, training) -> str:
    """What must match for a run to be resumed: every argument that changes the cores."""
    values = {f"{type(a).__name__}.{k}": v for a in (distillation, sae, activations, attribution)
              for k, v in dataclasses.asdict(a).items()}  # fmt: skip
    values.update({f"training.{name}": getattr(training, name) for name in _TRAINING_FIELDS})
    for name in ("model_repo", "random_core_control"):  # naming the repos or adding the control keeps the cores
        values.pop(f"DistillationArguments.{name}")
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_model_repo(activation_args: ActivationArguments) -> str:
    name = activation_args.model_name_or_path.replace("embedded:", "").split("/")[-1].lower()
    return f"dmsae-{name}-l{activation_args.hook_layer}"


class Distillation:
    """One distillation run; `run()` does every remaining step and returns the distilled core."""

    def __init__(self, distillation: DistillationArguments, sae: SAEArguments, activations: ActivationArguments,
                 attribution: AttributionArguments, training: DMSAETrainingArguments):  # fmt: skip
        self.args, self.sae_args, self.activation_args = distillation, sae, activations
        self.attribution_args, self.training_args = attribution, training
        self.output_dir = Path(training.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fingerprint = _fingerprint(distillation, sae, activations, attribution, training)
        self.state = RunState(self.output_dir / "state.json", fingerprint, writer=training.process_index == 0)
        self.model_repo = distillation.model_repo or training.hub_model_id or default_model_repo(activations)

    @cached_property
    def data(self) -> ActivationData:
        """The LM and the activation datasets, loaded (or harvested) on first use."""
        return prepare_activations(self.activation_args, self.training_args)

    # -- one cycle ----------------------------------------------------------------------------------------------
    def _new_model(self, t: int, core: DMSAECore | None, seed: int) -> DMSAEModel:
        set_seed(seed)
        if core is None:
            return DMSAEModel(sae_config(self.sae_args, self.activation_args, self.data, cycle=t))
        config = sae_config(self.sae_args, self.activation_args, self.data, cycle=t, core_size=len(core),
                            core_ids=core.latent_ids)  # fmt: skip
        return DMSAEModel.from_core(config, core.rows_at_scale(config.norm_factor), core.latent_ids)

    def _cycle_training_args(self, folder: Path, seed: int) -> DMSAETrainingArguments:
        return dataclasses.replace(self.training_args, output_dir=str(folder), seed=seed, push_to_hub=False)

    def _train_and_select(self, name: str, model: DMSAEModel, seed: int, **provenance) -> tuple[DMSAECore, dict]:
        """Train `model` in `output_dir/name` (resuming), score it and select its core; returns the core and the
        held-out metrics. A model trained before a crash is read back instead of trained again."""
        folder = self.output_dir / name
        record = self.state.data.setdefault("runs", {}).setdefault(name, {})
        provenance = {"source_model": str(folder), **provenance}
        attribution = AttributionCallback(self.data.lm, self.data.tokenizer, self.activation_args,
                                          self.attribution_args, **provenance)  # fmt: skip
        if not record.get("trained"):
            trainer = train_sae(model, self.data, self._cycle_training_args(folder, seed), callbacks=[attribution])
            metrics = trainer.evaluate() if self.data.eval is not None else {}
            record.update(trained=True, metrics=metrics, log_history=trainer.state.log_history)
            self.state.save()
        core = attribution.core
        if core is None:  # trained before a crash: score the saved model (every process its share)
            model = DMSAEModel.from_pretrained(folder).to(self.training_args.device).eval()
            core = select_core(model, self.data.lm, self.data.tokenizer, self.activation_args, self.attribution_args,
                               **provenance)  # fmt: skip
            if self.state.writer:
                core.save_pretrained(folder / "core")
        return core, record["metrics"]

    def _cycle(self, t: int, previous: DMSAECore | None) -> DMSAECore:
        record = self.state.cycle(t)
        if record.get("core"):
            return DMSAECore.from_pretrained(self.output_dir / record["core"])
        seed = self.training_args.seed + t
        if t == 0 and self.args.cycle0_checkpoint:
            model = load_dictionary_learning(self.args.cycle0_checkpoint).to(self.training_args.device)
            core = select_core(model.eval(), self.data.lm, self.data.tokenizer, self.activation_args,
                               self.attribution_args, cycle=0, source_model=self.args.cycle0_checkpoint)  # fmt: skip
            metrics = {}
        else:
            core, metrics = self._train_and_select(f"cycle{t}", self._new_model(t, previous, seed), seed, cycle=t)
        repo = core_repo_name(self.model_repo, t)
        folder = self._repo_folder(repo)
        if self.state.writer:
            write_core_repo(core, folder, repo, datasets=[self.activation_args.dataset_name_or_path])
        carried = len(set(core.latent_ids) & set(previous.latent_ids)) if previous is not None else 0
        record.update(core=str(Path(folder).relative_to(self.output_dir)), size=len(core), coverage=core.coverage,
                      carried_over=carried, metrics=metrics)  # fmt: skip
        self.state.save()
        logger.info("Cycle %d: core of %d latents (%.3f coverage), %d carried over", t, len(core), core.coverage,
                    carried)  # fmt: skip
        return core

    # -- the whole run ------------------------------------------------------------------------------------------
    def run(self) -> DMSAECore:
        cores: list[DMSAECore] = []
        for t in range(self.args.num_cycles + 1):
            cores.append(self._cycle(t, cores[-1] if cores else None))
        distilled = cores[-1].intersect(cores[-2], distilled=True, cycle=self.args.num_cycles)
        repo = core_repo_name(self.model_repo, None)
        folder = self._repo_folder(repo)
        if self.state.writer:
            plots = [figures.coverage_curves(cores, self.attribution_args.tau, self.figure("coverage_curves")),
                     figures.carry_over(self.carry_over(), self.figure("carry_over"))]  # fmt: skip
            write_core_repo(distilled, folder, repo, datasets=[self.activation_args.dataset_name_or_path],
                            carry_over=self.carry_over(), figures=plots)  # fmt: skip
        self.state.data["distilled"] = {"core": str(folder.relative_to(self.output_dir)), "size": len(distilled)}
        self.state.save()
        if self.args.random_core_control:
            self._control(distilled)
        self._publish()
        return distilled

    def report(self) -> str:
        """A markdown summary of the run, written to `report.md`."""
        lines = [f"# Distillation report: {self.model_repo}", "",
                 "| cycle | core size | coverage | carried over from previous core | held-out FVU | L0 core | L0 non-core |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in range(self.args.num_cycles + 1):
            c = self.state.cycle(t)
            m = c.get("metrics", {})
            cells = [t, c["size"], f"{c['coverage']:.3f}", c["carried_over"] if t else "–"]
            cells += [f"{m[k]:.4f}" if k in m else "–" for k in ("eval_fvu", "eval_l0_core", "eval_l0_noncore")]
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
        lines += ["", f"Distilled core `C^({self.args.num_cycles}) ∩ C^({self.args.num_cycles - 1})`: "
                  f"**{self.state.data['distilled']['size']} latents**.", ""]  # fmt: skip
        if control := self.state.data.get("control"):
            lines += ["## Random-core control", "", "| core | final L0 core | held-out FVU |", "|---|---|---|"]
            for name, result in control.items():
                final = result["l0_core_curve"][-1][1] if result["l0_core_curve"] else float("nan")
                lines.append(f"| {name} | {final:.2f} | {result['metrics'].get('eval_fvu', float('nan')):.4f} |")
            lines.append("")
        lines += [f"![{p.stem}](figures/{p.name})" for p in sorted((self.output_dir / "figures").glob("*.png"))]
        lines += ["", "## Repos", ""]
        lines += [f"- `{p.name.replace('__', '/')}`: `{p}`" for p in sorted((self.output_dir / "repos").iterdir())]
        text = "\n".join(lines) + "\n"
        if self.state.writer:
            (self.output_dir / "report.md").write_text(text)
        return text

    def carry_over(self) -> list[dict]:
        cycles = sorted(self.state.data["cycles"].items(), key=lambda item: int(item[0]))
        return [{"cycle": int(t), "size": c["size"], "kept": c["carried_over"]} for t, c in cycles if "size" in c]

    def _control(self, distilled: DMSAECore) -> None:
        """Fig. 3: the distilled core and a random core of the same size (latents drawn from the last cycle's pool
        outside the distilled core), trained alike; the random core's L0 falls, the distilled core's does not."""
        if self.state.data.get("control"):
            return
        generator = torch.Generator().manual_seed(self.training_args.seed)
        last_model = DMSAEModel.from_pretrained(self.output_dir / f"cycle{self.args.num_cycles}")
        ids = last_model.config.latent_ids()
        candidates = [j for j, i in enumerate(ids) if i not in set(distilled.latent_ids)]
        picked = [candidates[j] for j in torch.randperm(len(candidates), generator=generator)[: len(distilled)]]
        random_core = dataclasses.replace(
            distilled, encoder_rows=last_model.W_enc[picked].detach().clone(), latent_ids=[ids[j] for j in picked],
            scores=torch.zeros(len(picked)),
        )  # fmt: skip
        t, seed = self.args.num_cycles + 1, self.training_args.seed + self.args.num_cycles + 1
        results = {}
        for name, core in (("distilled", distilled), ("random", random_core)):
            model = self._new_model(t, core, seed)
            _, metrics = self._train_and_select(f"control_{name}", model, seed, cycle=t, control=name)
            history = self.state.data["runs"][f"control_{name}"]["log_history"]
            curve = [(entry["step"], entry["l0_core"]) for entry in history if "l0_core" in entry]
            results[name] = {"metrics": metrics, "l0_core_curve": curve}
        self.state.data["control"] = results
        self.state.save()
        if self.state.writer:
            figures.l0_core_curves({name: r["l0_core_curve"] for name, r in results.items()}, self.figure("l0_core"))

    def _publish(self) -> None:
        """Write the model's repo and push every repo folder (main process; only with `push_to_hub`)."""
        if not self.state.writer:
            return
        push = self.training_args.push_to_hub
        token = self.training_args.hub_token
        for t in range(self.args.num_cycles + 1):
            folder = self.output_dir / self.state.cycle(t)["core"]
            publish(folder, core_repo_name(self.model_repo, t), push=push, token=token)
        publish(self.output_dir / self.state.data["distilled"]["core"], core_repo_name(self.model_repo, None),
                push=push, token=token)  # fmt: skip
        last = DMSAEModel.from_pretrained(self.output_dir / f"cycle{self.args.num_cycles}")
        metrics = self.state.cycle(self.args.num_cycles).get("metrics", {})
        folder = write_model_repo(last, self._repo_folder(self.model_repo), self.model_repo,
                                  datasets=[self.activation_args.dataset_name_or_path],
                                  metrics={k: round(v, 4) for k, v in metrics.items()})  # fmt: skip
        publish(folder, self.model_repo, push=push, token=token)

    def figure(self, name: str) -> Path:
        return self.output_dir / "figures" / f"{name}.png"

    def _repo_folder(self, repo_id: str) -> Path:
        """Where the local copy of a repo lives: `<output_dir>/repos/<org>__<name>`."""
        return self.output_dir / "repos" / repo_id.replace("/", "__")
