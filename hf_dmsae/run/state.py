"""`RunState`: `state.json` in a run's output folder, holding the run's identity (every argument that changes its
results, and the identity of its inputs: LM weights, dataset, cores, checkpoints), the slices of the token stream it
reads and what each step produced. A run is resumed only with the same identity; a difference is refused, naming the
fields. The main process holds a lock on the folder while the run lives."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from filelock import FileLock, Timeout

from ..data.activations import ActivationArguments
from ..data.cache import identity_difference
from ..data.slices import SliceLayout
from ..model.core import DMSAECore
from ..utils.integrity import NUMBER, Each, IntegrityError, check_record, inside, read_json, write_json_atomically
from .trainer import DMSAETrainingArguments

TRAINING_FIELDS = (
    "learning_rate",
    "core_threshold_learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "seed",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "decay_fraction",
    "resample_dead_every",
    "bf16",
    "fp16",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "init_decoder_bias_rows",
    "calibrate_threshold_rows",
    "train_decoder_bias",
    "unit_norm_decoder",
    "world_size",
)


STATE_REMEDY = "repair it or restore it from a backup; deleting the folder starts the run over"

_SLICE = {"name": str, "split": str, "start": dict, "rows?": (int, type(None)), "sequences?": (int, type(None))}
_CORE = {"core?": str, "core_digest?": str, "size?": int}
RECORDS = {
    "distillation": {
        "cycles?": Each({**_CORE, "carried_over?": int, "metrics?": dict, "stages?": dict, "log_history?": list}),
        "distilled?": {**_CORE, "last_cycle?": int},
        "control?": Each(dict),
        "setup?": dict,
        "publish?": dict,
    },
    "transfer": {"results?": Each({"k": int, "variant": str}), "core?": dict},
    "core_dynamics": {"runs?": Each(dict)},
    "train": {"metrics?": Each(NUMBER)},
}
"""The records each kind of run nests in its `state.json` beside kind, identity and slices, checked when read."""


def state_schema(kind: str, *present: str) -> dict:
    """The schema of a `kind` run's `state.json`, with the records named in `present` required."""
    records = {
        (k.removesuffix("?") if k.removesuffix("?") in present else k): v for k, v in RECORDS.get(kind, {}).items()
    }
    return {"kind": str, "identity": dict, "slices": Each(_SLICE, of=(list,)), **records}


def read_state(folder: str | Path, kind: str, *present: str) -> dict:
    """A finished `kind` run's `state.json`, read and checked as `RunState` reads it, without its lock: what a report
    reads."""
    return read_json(Path(folder) / "state.json", state_schema(kind, *present), STATE_REMEDY)


def recorded_identity_difference(recorded: dict, identity: dict) -> str:
    """The fields both identities hold with different values, as text (empty: none). A field only one holds is no
    difference: one added to the identity since (its default keeps the recorded results' behaviour) or one no longer
    in it (e.g. a study's variants, which it may extend); but a recorded identity sharing no field with
    `identity` (emptied by hand) matches nothing, so `identity` must be the whole of what a file records."""
    shared = [k for k in identity if k in recorded]
    if identity and not shared:
        return f"the recorded identity holds none of its {len(identity)} fields ({', '.join(list(identity)[:3])}, …)"
    difference = identity_difference({k: recorded[k] for k in shared}, {k: identity[k] for k in shared})
    return "; ".join(f"{k}: recorded {old!r}, now {new!r}" for k, (old, new) in difference.items())


def arguments_identity(*arguments, exclude: tuple[str, ...] = ()) -> dict:
    """`{"Class.field": value}` of argument dataclasses (training arguments: `TRAINING_FIELDS` only)."""
    identity = {}
    for args in arguments:
        prefix = type(args).__name__
        if isinstance(args, DMSAETrainingArguments):
            values = {name: getattr(args, name) for name in TRAINING_FIELDS}
        else:
            values = dataclasses.asdict(args)
        for name, value in values.items():
            if name not in exclude and f"{prefix}.{name}" not in exclude:
                identity[f"{prefix}.{name}"] = json.loads(json.dumps(value, default=str))
    if any(isinstance(a, ActivationArguments) for a in arguments):
        activation_args = next(a for a in arguments if isinstance(a, ActivationArguments))
        identity["ActivationArguments.cached"] = activation_args.activation_cache is not None
    return identity


class RunState:
    """`state.json` of an output folder: kind, identity, slices and records; rewritten atomically by the main
    process (`writer`), which also holds the folder's lock (`.lock`) as long as this object lives."""

    def __init__(self, output_dir: str | Path, kind: str, identity: dict, *, writer: bool):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "state.json"
        self.writer = writer
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._lock = None
        if writer:
            self._lock = FileLock(str(self.output_dir / ".lock"))
            try:
                self._lock.acquire(timeout=0)
            except Timeout:
                raise RuntimeError(
                    f"{self.output_dir} is in use by another run (its .lock is held); wait for it to "
                    "finish or choose another output_dir"
                ) from None
        self.data = {"kind": kind, "identity": {}, "slices": []}
        if self.path.is_file():
            data = read_json(self.path, {"kind": str}, STATE_REMEDY)
            if data["kind"] != kind:
                raise ValueError(
                    f"{self.output_dir} holds a {data['kind']} run, not a {kind} run; use another output_dir"
                )
            self.data = check_record(self.path, data, state_schema(kind), STATE_REMEDY)
            if identity and (difference := recorded_identity_difference(self.data["identity"], identity)):
                self._refuse(difference)
        elif any(p.name.startswith("checkpoint-") for p in self.output_dir.iterdir()):
            raise ValueError(f"{self.output_dir} holds checkpoints but no state.json: it is not this run's folder")
        self.require(identity)

    def require(self, identity: dict) -> None:
        """Check `identity` against what the run recorded (refusing any difference, naming the fields) and record
        what is new."""
        recorded = self.data["identity"]
        shared = {k: v for k, v in identity.items() if k in recorded}
        if difference := recorded_identity_difference(recorded, shared) if shared else "":
            self._refuse(difference)
        recorded.update(identity)
        self.save()

    def _refuse(self, difference: str) -> None:
        raise ValueError(
            f"{self.output_dir} holds a {self.data['kind']} run with other settings ({difference}). Use another "
            "output_dir, or delete it to start over."
        )

    def close(self) -> None:
        """Release the folder's lock (a process's exit releases it too)."""
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None

    @property
    def slices(self) -> SliceLayout:
        return SliceLayout(self.data["slices"])

    def record(self, *keys: str) -> dict:
        """The record at `data[keys[0]][keys[1]]…`, created empty if missing."""
        node = self.data
        for key in keys:
            node = node.setdefault(key, {})
        return node

    def save(self) -> None:
        if self.writer:
            write_json_atomically(self.path, self.data)


def carry_over(state: dict) -> list[dict]:
    """Fig. 2's numbers: each cycle's core size and how many of its latents the previous core held."""
    cycles = sorted(state["cycles"].items(), key=lambda item: int(item[0]))
    return [{"cycle": int(t), "size": c["size"], "kept": c["carried_over"]} for t, c in cycles if "size" in c]


def load_recorded_core(folder: Path, record: dict) -> DMSAECore:
    """The core a run recorded (`record["core"]`, a path under `folder`), refused if its files changed since."""
    path = inside(folder, record["core"])
    core = DMSAECore.from_pretrained(path)
    if core.digest() != record["core_digest"]:
        raise IntegrityError(f"{path} changed since the run wrote it")
    return core


def distilled_core_record(folder: Path) -> dict:
    """The `distilled` record of the finished distillation in `folder` (its core: `load_recorded_core`)."""
    path = folder / "state.json"
    schema = {"kind?": str, **RECORDS["distillation"]}
    state = read_json(path, schema, STATE_REMEDY) if path.is_file() else {}
    if "distilled" not in state:
        raise FileNotFoundError(
            f"{folder} holds no finished distillation: run it first (scripts/distill.py or scripts/synthetic.py), "
            "or point --distillation_dir at one"
        )
    finished = {"core": str, "core_digest": str, "size": int, "last_cycle": int}
    return check_record(path, state, {"distilled": finished}, STATE_REMEDY)["distilled"]
