"""`StudyResults`: a study's `results.json`, the artifact a study commits and continues from on another machine.

It is read through the typed reader (`read_json` with the study's schema, so a damaged record is refused by name, not
dropped from a mean or met as a raw `KeyError`), checked against the study's identity, and held under a lock on the
file while the study runs: a second study on the same results folder is refused by name instead of rewriting the
file whole with only its own seeds. The schemas live here, below `reporting/`, which reads the same files.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from ..evaluation.saebench import HEADLINE_METRICS
from ..utils.integrity import NUMBER, Each, read_json, write_json_atomically
from .state import recorded_identity_difference

RESULTS_REMEDY = (
    "restore it from its commit or a backup (deleting it loses every result it holds), or give the study another "
    "results folder"
)

MODEL_METRICS = (
    "fvu",
    "l0_core",
    "l0_noncore",
    "dead_fraction",
    *(f"ce_loss_{name}" for name in ("clean", "spliced", "zero_ablated", "recovered")),
    *(name for _, _, name in HEADLINE_METRICS),
)
MODEL = {
    "variant": str,
    "k": int,
    "l0": NUMBER,
    **{f"{name}?": NUMBER for name in MODEL_METRICS},
    "saebench?": dict,
    "convergence?": dict,
}
"""A trained model's record in a study (a transfer's result): its variant, k, measured L0 and metrics."""

CLAIMS_RESULTS = {
    "models": Each(Each(MODEL)),
    "matched?": Each(Each(dict)),
    "latent_matches?": {"seeds": list, "variants": dict},
    "core?": {"source": str, "size": int, "digest": str},
    "cores?": Each({"source": str, "size": int, "digest": str}),
    "core_overlap?": {"seeds": list, "match_cos": NUMBER, "sizes": list, "distilled": list, "random_trained": list},
    "variant_settings?": Each(dict),
}
WORLDS_RESULTS = {
    "worlds": Each({"settings": dict, "properties": dict, "screen_mcc": NUMBER, "kept": bool, "summary?": dict}),
    "across_worlds?": dict,
}
SYNTHETIC_RESULTS = {"seconds?": Each(NUMBER), "matched?": dict, "consistency?": dict, "world?": dict}
SCORERS_RESULTS = {
    "synthetic?": Each(Each(dict)),
    "lm?": {"model": str, "pool": int, "scorers?": Each({"scores": list})},
}
CONVERGENCE_RESULTS = {
    "models?": Each(
        {"setting": str, "overrides": dict, "variant": str, "k": int, "seed": int, "fvu": NUMBER, "convergence": dict}
    ),
    "candidates?": list,
    "matched?": Each(dict),
    "twice?": Each({"fvu_gain": NUMBER}),
    "chosen?": dict,
    "screen_k?": int,
}
CORE_DYNAMICS_RESULTS = {
    "source": str,
    "runs": Each(
        {
            "ablation": str,
            "core": str,
            "budget": int,
            "seed": int,
            "core_size": int,
            "metrics": dict,
            "fvu_curve": list,
        },
        of=(list,),
    ),
    "budgets": list,
    "ablations": dict,
    "sparsity": str,
}


class StudyResults:
    """`path` (a study's `results.json`), locked by the process that writes it (`writer`) as long as this object
    lives; `data` is what it holds, or a fresh record of `identity`. With `identity=None` the file is not read: the
    study rebuilds it whole from its runs' own states."""

    def __init__(self, path: str | Path, identity: dict | None, schema: dict, *, writer: bool = True):
        self.path, self.writer = Path(path), writer
        self._lock = None
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(f"{self.path}.lock")
            try:
                self._lock.acquire(timeout=0)
            except Timeout:
                raise RuntimeError(
                    f"{self.path} is being written by another study (its .lock is held): wait for it to finish, or "
                    "give this one another results folder"
                ) from None
        self.data: dict = {} if identity is None else {"identity": identity}
        self.recorded_identity = self.data.get("identity")
        """The identity the file held (fields since dropped from the study's identity included); `data` holds the
        study's own."""
        if identity is not None and self.path.is_file():
            try:
                self.data = read_json(self.path, {"identity": dict, **schema}, RESULTS_REMEDY)
                if difference := recorded_identity_difference(self.data["identity"], identity):
                    raise ValueError(
                        f"{self.path} holds results of other settings ({difference}): use another results folder"
                    )
            except BaseException:
                self.close()
                raise
            self.recorded_identity, self.data["identity"] = self.data["identity"], identity

    def save(self) -> None:
        if self.writer:
            write_json_atomically(self.path, self.data)

    def close(self) -> None:
        """Release the lock (a process's exit releases it too)."""
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None

    def __enter__(self) -> StudyResults:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
