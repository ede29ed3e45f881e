"""Hub repos of a distillation run: names, model cards and publishing (SPEC section 6).

Every artifact (each cycle's core, the distilled core, each trained model) is first written as a complete local
folder, model card included; publishing then pushes that folder as a single commit, so a failed push leaves
nothing half-made on the Hub. Only the main process pushes; `huggingface_hub` retries transient server errors;
without a token or with pushing off, the local folders are the result.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from accelerate import PartialState
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import get_token

from .core import DMSAECore
from .embedded import hub_name
from .modeling_dmsae import DMSAEModel

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "model_cards"
TAGS = ["dmsae", "sparse-autoencoder", "matryoshka", "interpretability", "hf_dmsae"]


class HubPushError(RuntimeError):
    """A push that failed for good; the local folder still holds everything."""


def core_repo_name(model_repo: str, cycle: int | None) -> str:
    """`org/dmsae-…-core-cycle{t}`, or `org/dmsae-…-core-distilled` for `cycle=None`."""
    return f"{model_repo}-core-distilled" if cycle is None else f"{model_repo}-core-cycle{cycle}"


def _card_data(base_model: str | None, datasets: list[str] | None, **extra) -> ModelCardData:
    return ModelCardData(
        library_name="hf_dmsae",
        tags=TAGS,
        base_model=hub_name(base_model) if base_model else None,
        datasets=[hub_name(d) for d in datasets] if datasets else None,
        **extra,
    )


def _copy_figures(folder: Path, figures: list[Path] | None) -> list[str]:
    """Copy the figure files into the repo folder; the card links them by name."""
    for figure in figures or []:
        shutil.copyfile(figure, folder / Path(figure).name)
    return [Path(figure).name for figure in figures or []]


def write_core_repo(core: DMSAECore, folder: str | Path, repo_id: str, *, datasets: list[str] | None = None,
                    carry_over: list[dict] | None = None, figures: list[Path] | None = None) -> Path:  # fmt: skip
    """Save `core` with its model card (and the given figure files) into `folder`."""
    folder = Path(folder)
    core.save_pretrained(folder)
    card = ModelCard.from_template(
        _card_data(core.provenance.get("base_model"), datasets, metrics=["attribution_coverage"]),
        template_path=str(TEMPLATES / "core.md"),
        repo_id=repo_id,
        size=len(core),
        coverage=core.coverage,
        provenance=core.provenance,
        distilled=core.provenance.get("distilled", False),
        carry_over=carry_over or [],
        figures=_copy_figures(folder, figures),
    )
    card.save(folder / "README.md")
    return folder


def write_model_repo(model: DMSAEModel, folder: str | Path, repo_id: str, *, datasets: list[str] | None = None,
                     metrics: dict | None = None, figures: list[Path] | None = None) -> Path:  # fmt: skip
    """Save `model` (safetensors, config, remote code) with its model card (and figure files) into `folder`."""
    folder = Path(folder)
    model.save_pretrained(folder)
    card = ModelCard.from_template(
        _card_data(model.config.base_model, datasets, metrics=sorted(metrics or {})),
        template_path=str(TEMPLATES / "model.md"),
        repo_id=repo_id,
        config=model.config,
        metrics=metrics or {},
        figures=_copy_figures(folder, figures),
    )
    card.save(folder / "README.md")
    return folder


def publish(folder: str | Path, repo_id: str, *, push: bool = True, token: str | None = None,
            api: HfApi | None = None) -> str:  # fmt: skip
    """Push the local `folder` to `repo_id` as one commit and return the repo's URL; return the folder's path
    instead when pushing is off, there is no token, or this is not the main process.

    `huggingface_hub` already retries transient errors (429, 5xx, connection) with backoff. A push that still fails
    raises `HubPushError`, after deleting the repo if this call created it, so no half-made repo stays behind.
    """
    folder = Path(folder)
    token = token or get_token()
    if not push or not PartialState().is_main_process:
        return str(folder)
    if token is None:
        logger.warning("No Hugging Face token: %s stays a local folder at %s", repo_id, folder)
        return str(folder)
    api = api or HfApi(token=token)
    created = not api.repo_exists(repo_id)
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"Upload {folder.name}")
    except (HfHubHTTPError, OSError) as error:
        if created and api.repo_exists(repo_id):
            api.delete_repo(repo_id)
        raise HubPushError(
            f"Pushing {folder} to {repo_id} failed: {error}. Nothing was committed"
            f"{' and the new repo was deleted' if created else ''}; the complete content is in {folder}."
        ) from error
    logger.info("Pushed %s to %s (commit %s)", folder, url, commit.oid)
    return str(url)
