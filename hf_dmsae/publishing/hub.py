"""Hub repos of a distillation run: names, model cards and publishing (docs/method.md §6).

Every artifact (each cycle's core, the distilled core, each trained model) is first written as a complete local
folder, model card included; publishing then pushes each folder as a single commit, and a failure removes the repos
the publishing created, so no half-made repo or half-published set stays behind. Only the main process pushes;
`huggingface_hub` retries transient server errors; with pushing off, the local folders are the result.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import PartialState
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import get_token

from ..data.embedded import describe, hub_name
from ..data.language_model import HOOK_POINTS
from ..model.core import DMSAECore
from ..model.modeling_dmsae import DMSAEModel
from . import card_figures
from .formats import hook_point, save_sae_lens

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parents[1] / "model_cards"
TAGS = ["dmsae", "sparse-autoencoder", "matryoshka", "interpretability", "hf_dmsae"]
LICENSE = "apache-2.0"  # the package's; the card says so, and the base model's terms apply to it
# The held-out metrics a card reports (a run's log also holds runtimes and epochs, which are not the model's).
CARD_METRICS = ("fvu", "l0", "l0_core", "l0_noncore", "dead_fraction", "ce_loss_recovered")


class HubPushError(RuntimeError):
    """A push that failed for good; the local folder still holds everything."""


def default_model_repo(activation_args) -> str:
    """`dmsae-<lm>-l<layer>` for a run's `ActivationArguments`."""
    name = activation_args.model_name_or_path.replace("embedded:", "").rstrip("/").split("/")[-1].lower()
    return f"dmsae-{name}-l{activation_args.hook_layer}"


def check_push_token(push_to_hub: bool, hub_token: str | None) -> None:
    """A run that is to push must have a token before it spends hours training."""
    if push_to_hub and not (hub_token or get_token()):
        raise ValueError("push_to_hub needs a Hugging Face token (hub_token, HF_TOKEN or `hf auth login`)")


def check_repo_id(repo_id: str, what: str = "repo") -> str:
    """`repo_id` if it follows the Hub's naming rules (`name` or `org/name`; no `.`/`..` names, no `--`), which also
    keep its local folder inside `<output_dir>/repos`; else a `ValueError` naming `what`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{what}={repo_id!r} is not a Hub repo name: {error}") from None
    return repo_id


def repo_folder(output_dir: str | Path, repo_id: str) -> Path:
    """Where a run keeps the local copy of a repo: `<output_dir>/repos/<org>__<name>`."""
    return Path(output_dir) / "repos" / check_repo_id(repo_id).replace("/", "__")


def core_repo_name(model_repo: str, cycle: int | None) -> str:
    """`org/dmsae-…-core-cycle{t}`, or `org/dmsae-…-core-distilled` for `cycle=None`."""
    return f"{model_repo}-core-distilled" if cycle is None else f"{model_repo}-core-cycle{cycle}"


def hub_dataset_ids(datasets: list[str] | None) -> list[str]:
    """The datasets that have a Hub id (`org/name`); embedded corpora and local paths have none."""
    return [
        d
        for d in datasets or []
        if ":" not in d
        and not Path(d).expanduser().exists()
        and not d.startswith((".", "/", "~"))
        and d.count("/") == 1
    ]


def card_metrics(metrics: dict | None) -> dict[str, float]:
    """`metrics` as a card reports them: the held-out metrics and SAEBench's headline ones (`sb_*`), without the
    `eval_` prefix, rounded."""
    named = {k.removeprefix("eval_"): v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    keys = [k for k in CARD_METRICS if k in named] + sorted(k for k in named if k.startswith("sb_"))
    return {k: round(float(named[k]), 4) for k in keys}


def _eval_results(metrics: dict[str, float], datasets: list[str] | None) -> list[EvalResult] | None:
    """The card's `model-index`: one result per metric, on the held-out text of the run's dataset."""
    dataset = (hub_dataset_ids(datasets) or datasets or ["held-out text"])[0]
    return [
        EvalResult(
            task_type="feature-extraction",
            task_name="Sparse autoencoder evaluation",
            dataset_type=dataset,
            dataset_name=f"{dataset} (held-out)",
            metric_type=name,
            metric_name=f"{name} (SAEBench)" if name.startswith("sb_") else name,
            metric_value=value,
        )
        for name, value in metrics.items()
    ] or None


def _card_data(base_model: str | None, datasets: list[str] | None, tags=tuple(TAGS), **extra) -> ModelCardData:
    return ModelCardData(
        library_name="hf_dmsae",
        license=LICENSE,
        tags=list(tags),
        base_model=hub_name(base_model) if base_model else None,
        datasets=hub_dataset_ids(datasets) or None,
        **extra,
    )


def write_core_repo(
    core: DMSAECore,
    folder: str | Path,
    repo_id: str,
    *,
    datasets: list[str] | None = None,
    cycles: list[DMSAECore] | None = None,
    tau: float | None = None,
    carry_over: list[dict] | None = None,
    related: dict[str, str] | None = None,
) -> Path:
    """Save `core` with its model card into `folder`; a distilled core's card shows its distillation's `cycles`'
    coverage curves (with `tau`) and their `carry_over` (Fig. 2), drawn here."""
    folder = Path(folder)
    core.save_pretrained(folder)
    figures = []
    if cycles:
        figures.append(card_figures.coverage_curves(cycles, tau, folder / "coverage_curves.png"))
    if carry_over:
        figures.append(card_figures.carry_over(carry_over, folder / "carry_over.png"))
    card = ModelCard.from_template(
        _card_data(core.provenance.get("base_model"), datasets, metrics=["attribution_coverage"]),
        template_path=str(TEMPLATES / "core.md"),
        repo_id=repo_id,
        size=len(core),
        coverage=core.coverage,
        provenance=core.provenance,
        distilled=core.provenance.get("distilled", False),
        carry_over=carry_over or [],
        figures=[figure.name for figure in figures],
        related=related or {},
    )
    card.save(folder / "README.md")
    return folder


def write_model_repo(
    model: DMSAEModel,
    folder: str | Path,
    repo_id: str,
    *,
    datasets: list[str] | None = None,
    metrics: dict | None = None,
    related: dict[str, str] | None = None,
    convergence: dict | None = None,
    activations=None,
) -> Path:
    """Save `model` (safetensors, config, remote code) with its model card into `folder`, and its SAELens export in
    the subfolder named by its hook (`blocks.{layer}.hook_{hook}`, which `SAE.from_pretrained(repo_id, sae_id)`
    reads; `activations`: the run's `ActivationArguments`, for how it read the text), where the model has one
    (`sae_lens_export`); the card says whether it converged (`convergence`, the record `evaluation.convergence`
    writes), where that was recorded."""
    folder = Path(folder)
    model.save_pretrained(folder)
    metrics = card_metrics(metrics)
    config = model.config
    sae_id, why_not = sae_lens_export(model)
    if sae_id:
        save_sae_lens(model, folder / sae_id, activations)
    else:
        logger.info("%s gets no SAELens export: %s", repo_id, why_not)
    card = ModelCard.from_template(
        _card_data(
            config.base_model,
            datasets,
            metrics=sorted(metrics),
            model_name=repo_id,
            eval_results=_eval_results(metrics, datasets),
            tags=[*TAGS, "saelens"] if sae_id else TAGS,
        ),
        template_path=str(TEMPLATES / "model.md"),
        repo_id=repo_id,
        config=config,
        base_model=hub_name(config.base_model) if config.base_model else None,
        hook_point=hook_point(config) if config.hook_layer is not None and config.hook_name else None,
        sae_lens_id=sae_id,
        threshold=float(model.threshold),
        datasets=[describe(d) for d in datasets or []],
        metrics=metrics,
        related=related or {},
        convergence=convergence,
    )
    card.save(folder / "README.md")
    return folder


def sae_lens_export(model: DMSAEModel) -> tuple[str | None, str | None]:
    """`(subfolder, None)` where `model` has a SAELens export in its repo, else `(None, why not)`: it needs its hook
    and LM named, an inference threshold and rectified latents (not a `linear_core`)."""
    config = model.config
    if config.hook_layer is None or config.hook_name not in HOOK_POINTS or not config.base_model:
        return None, "its config names no LM hook point (hook_layer, hook_name, base_model)"
    if float(model.threshold) < 0:
        return None, "it has no inference threshold"
    if config.core_linear:
        return None, "a linear core's signed latents are not a JumpReLU SAE's"
    return hook_point(config), None


def resolve_folder(name_or_path: str, *, token: str | None = None) -> Path:
    """A local folder, or a Hub repo given as `org/name[/subfolder…][@revision]` (e.g. SAEBench's
    `canrager/saebench_gemma-2-2b_width-2pow16_date-0107/<release>/resid_post_layer_12/trainer_2`), downloaded with
    `snapshot_download` (only the subfolder's files); the folder holding what was asked for is returned."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{name_or_path} is a file; a folder (or Hub repo) is needed")
    repo, _, revision = name_or_path.partition("@")
    parts = [p for p in repo.split("/") if p]
    if name_or_path.startswith((".", "/", "~")) or len(parts) < 2:
        raise FileNotFoundError(f"{name_or_path!r}: no such local folder (nor a Hub repo id org/name[/subfolder])")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    check_repo_id(repo_id)
    if any(part in (".", "..") for part in parts[2:]):  # the folder must stay inside the downloaded snapshot
        raise ValueError(f"{name_or_path!r}: a Hub subfolder cannot have '.' or '..' in its path")
    try:
        root = snapshot_download(
            repo_id, revision=revision or None, token=token, allow_patterns=[f"{subfolder}/*"] if subfolder else None
        )
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError) as error:
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local folder nor a readable Hub repo "
            f"({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error
    folder = Path(root) / subfolder
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FileNotFoundError(f"Hub repo {repo_id}@{revision or 'main'} has no folder {subfolder!r}")
    return folder


def publish_all(
    items: list[tuple[str | Path, str]], *, push: bool = True, token: str | None = None, api: HfApi | None = None
) -> list[str]:
    """Push each local folder to its repo, one commit per repo, and return the repos' URLs; return the folders'
    paths instead when pushing is off or this is not the main process.

    `huggingface_hub` already retries transient errors (429, 5xx, connection) with backoff. A push that still
    fails, whatever the error, removes every repo this call created (so no half-published set stays behind, as far
    as the server still answers) and raises `HubPushError` naming the local folders, which hold everything.
    """
    items = [(Path(folder), repo_id) for folder, repo_id in items]
    if not push or not PartialState().is_main_process:
        return [str(folder) for folder, _ in items]
    token = token or get_token()
    if token is None:
        raise HubPushError(
            "push_to_hub needs a Hugging Face token (hub_token, HF_TOKEN or `hf auth login`); the "
            f"repos stay local: {', '.join(str(f) for f, _ in items)}"
        )
    api = api or HfApi(token=token)
    created, urls = [], []
    for folder, repo_id in items:
        try:
            existed = api.repo_exists(repo_id)
            url = api.create_repo(repo_id, exist_ok=True)
            if not existed:
                created.append(repo_id)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"Upload {folder.name}")
        except BaseException as error:  # any failure (HTTP, connection, Ctrl-C) leaves the same cleanup to do
            left = _remove_repos(api, created)
            removed = [r for r in created if r not in left]
            message = (
                f"Pushing {folder} to {repo_id} failed: {type(error).__name__}: {error}. Nothing more was committed"
            )
            if removed:
                message += f"; the new repos {removed} were deleted"
            if left:
                message += f"; the new repos {left} could not be deleted (the server did not answer): delete them"
            message += f". The complete content is in {', '.join(str(f) for f, _ in items)}."
            if not isinstance(error, Exception):  # an interrupt or an exit stays one, after the clean-up
                logger.error(message)
                raise
            raise HubPushError(message) from error
        logger.info("Pushed %s to %s (commit %s)", folder, url, commit.oid)
        urls.append(str(url))
    return urls


def _remove_repos(api: HfApi, repo_ids: list[str]) -> list[str]:
    """Delete the repos; return those that could not be deleted."""
    left = []
    for repo_id in repo_ids:
        try:
            if api.repo_exists(repo_id):
                api.delete_repo(repo_id)
        except Exception:  # the server may be gone: report the repo instead
            left.append(repo_id)
    return left


def publish(
    folder: str | Path, repo_id: str, *, push: bool = True, token: str | None = None, api: HfApi | None = None
) -> str:
    """`publish_all` for one folder."""
    return publish_all([(folder, repo_id)], push=push, token=token, api=api)[0]
