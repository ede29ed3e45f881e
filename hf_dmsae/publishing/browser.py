"""A static HTML feature browser for a DMSAE on a text split: one streaming pass, memory bounded in the tokens read.

For every latent it keeps, while the text streams by, the `top_contexts` highest activations with the tokens around
each (and the latent's activation on every one of them), a histogram of its non-zero activations on fixed log bins,
and how often it fires; after the pass, the tokens its decoder direction promotes and suppresses through the LM's
unembedding (`W_dec[j] · W_U`, the final norm left out). Core latents come first, with their cycle of origin, their
attribution score and the cycles whose cores selected them, when the cores are given. `index.html` lists every
latent in a table that sorts and filters; `latents/<j>.html` shows one.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.activations import ActivationArguments, Harvester
from ..data.text import StreamPosition, sequence_batches
from ..model.core import DMSAECore
from ..model.kernels import bag_bounds
from ..model.modeling_dmsae import DMSAEModel, SparseLatents
from ..utils.checks import check_ranges
from ..utils.integrity import IntegrityError, read_json, write_json_atomically

logger = logging.getLogger(__name__)


@dataclass
class BrowseArguments:
    """What to browse and how much to keep per latent."""

    model: str = field(metadata={"help": "The DMSAE: a local folder or a Hub repo id org/name[/subfolder][@revision]."})
    site_dir: str = field(metadata={"help": "Folder the site is written to (index.html, latents/<j>.html)."})
    split: str = field(default="test", metadata={"help": "Split of the text dataset to read."})
    browse_tokens: int = field(default=65_536, metadata={"help": "Token positions of the split to read."})
    cores: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Core folders or Hub ids (each cycle's, the distilled one) for attribution scores and the "
            "cycles that selected each latent."
        },
    )
    top_contexts: int = field(default=8, metadata={"help": "Top-activating contexts kept per latent."})
    context_before: int = field(default=12, metadata={"help": "Tokens shown before the activating token."})
    context_after: int = field(default=4, metadata={"help": "Tokens shown after the activating token."})
    logit_tokens: int = field(default=8, metadata={"help": "Promoted and suppressed tokens shown per latent."})
    max_pages: int | None = field(
        default=None,
        metadata={
            "help": "Write pages (and logit effects) for the first this many latents of the index's order "
            "(default: all)."
        },
    )
    statistics_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the statistics read from the text are saved (`FeatureStatistics.load` reads them) and, "
            "when they were read by the same model from the same text with the same settings, read back instead of "
            "the text (default: `<site_dir>/statistics`)."
        },
    )
    neuronpedia_dir: str | None = field(
        default=None,
        metadata={"help": "Also write every latent's data for Neuronpedia there (`publishing.neuronpedia`)."},
    )
    neuronpedia_set: str = field(default="dmsae", metadata={"help": "The SAE set's name in the Neuronpedia export."})

    def __post_init__(self):
        if self.browse_tokens < 1 or self.top_contexts < 1 or self.logit_tokens < 1:
            raise ValueError("browse_tokens, top_contexts and logit_tokens must be at least 1")
        if self.context_before < 0 or self.context_after < 0:
            raise ValueError("context_before and context_after must be non-negative")
        check_ranges(self, max_pages=">= 1")


# Log-spaced histogram bins of non-zero activations (the model's normalised units): 10^-3 … 10^2.
BIN_EDGES = torch.logspace(-3, 2, 26)
STATISTICS_FILE, ABOUT_FILE = "statistics.safetensors", "about.json"


class FeatureStatistics:
    """Per-latent top contexts, activation histogram and firing counts, updated batch by batch; `save` / `load`
    keep them beside what they were read from (`about`), so the site, a notebook or an export reads the text once."""

    TENSORS = ("values", "tokens", "window_acts", "histogram", "fired")

    def __init__(self, dict_size: int, top: int, width: int):
        self.top, self.width = top, width
        self.values = torch.zeros(0, dict_size)
        self.tokens = torch.zeros(0, dict_size, width, dtype=torch.int32)
        self.window_acts = torch.zeros(0, dict_size, width)
        self.histogram = torch.zeros(dict_size, len(BIN_EDGES) - 1, dtype=torch.long)
        self.fired = torch.zeros(dict_size, dtype=torch.long)
        self.rows = self.sequences = 0

    def save(self, folder: str | Path, about: dict) -> Path:
        """Write the statistics (`statistics.safetensors`) and `about.json`: `about` (the model's digest, the text,
        the settings), the rows and sequences read and the histogram's bin edges."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in self.TENSORS}
        save_file(tensors, folder / STATISTICS_FILE)
        shape = {"top": self.top, "width": self.width, "rows": self.rows, "sequences": self.sequences}
        write_json_atomically(folder / ABOUT_FILE, {**about, **shape, "bin_edges": BIN_EDGES.tolist()})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> tuple[FeatureStatistics, dict]:
        """The statistics `save` wrote in `folder`, and their `about`."""
        folder = Path(folder)
        about = read_json(folder / ABOUT_FILE, {"top": int, "width": int, "rows": int, "sequences": int})
        tensors = load_file(folder / STATISTICS_FILE)
        if missing := [name for name in cls.TENSORS if name not in tensors]:
            raise IntegrityError(f"{folder / STATISTICS_FILE} lacks {missing}: write the statistics again")
        stats = cls(len(tensors["fired"]), about["top"], about["width"])
        for name in cls.TENSORS:
            setattr(stats, name, tensors[name])
        stats.rows, stats.sequences = about["rows"], about["sequences"]
        return stats, about

    def update(self, latents: SparseLatents, windows: torch.Tensor, window_rows: torch.Tensor) -> None:
        """`latents` of N positions (sparse: at 65 536 latents no `[N, n]` tensor is built), `windows [N, width]`
        their context token ids (-1: none) and `window_rows [N, width]` the row of each context token among the N
        (-1: not a kept position)."""
        n, rows, cols, values = latents.shape[1], latents.rows, latents.cols, latents.values.float()
        self.fired += torch.bincount(cols, minlength=n)
        self.rows += latents.shape[0]
        bins = torch.bucketize(values, BIN_EDGES[1:-1])
        self.histogram.view(-1).index_add_(0, cols * self.histogram.shape[1] + bins, torch.ones_like(bins))
        # Each latent's largest entries of the batch: entries by column, within a column by descending value.
        order = values.argsort(descending=True, stable=True)
        order = order[cols[order].argsort(stable=True)]
        rank = torch.arange(len(order)) - bag_bounds(cols, n)[cols[order]]
        best = order[rank < self.top]
        depth, column = rank[rank < self.top], cols[best]
        top = min(self.top, latents.shape[0])
        batch_values = torch.zeros(top, n).index_put_((depth, column), values[best])  # [K, n]; 0: no entry
        picked = torch.zeros(top, n, dtype=torch.long).index_put_((depth, column), rows[best])
        tokens = windows[picked]  # [K, n, width]
        neighbours = window_rows[picked]  # [K, n, width]
        # Each latent's activation at its context tokens: looked up among the entries, keyed row · n + column.
        keys = rows * n + cols  # ascending: the entries are in (row, column) order
        wanted = neighbours.clamp_min(0) * n + torch.arange(n)[None, :, None]
        acts = torch.zeros(neighbours.shape)
        if len(keys):
            at = torch.searchsorted(keys, wanted).clamp_max(len(keys) - 1)
            acts = torch.where((neighbours >= 0) & (keys[at] == wanted), values[at], 0.0)
        merged = torch.cat([self.values, batch_values])
        order = merged.topk(min(self.top, len(merged)), dim=0).indices
        self.values = merged.gather(0, order)
        expand = order[:, :, None].expand(-1, -1, self.width)
        self.tokens = torch.cat([self.tokens, tokens]).gather(0, expand)
        self.window_acts = torch.cat([self.window_acts, acts]).gather(0, expand)


def context_windows(input_ids: torch.Tensor, keep: torch.Tensor, before: int, after: int):
    """For the kept positions of an LM batch (row-major order): their context token ids `[N, width]` and the row
    index among kept positions of each context token `[N, width]` (-1 where outside the sequence or not kept)."""
    batch, length = input_ids.shape
    row_of = torch.full((batch, length), -1, dtype=torch.long)
    row_of[keep] = torch.arange(int(keep.sum()))
    offsets = torch.arange(-before, after + 1)
    b, c = keep.nonzero(as_tuple=True)
    columns = c[:, None] + offsets[None, :]
    inside = (columns >= 0) & (columns < length)
    columns = columns.clamp(0, length - 1)
    tokens = torch.where(inside, input_ids[b[:, None], columns], -1).to(torch.int32)
    rows = torch.where(inside, row_of[b[:, None], columns], -1)
    return tokens, rows


@torch.no_grad()
def collect(sae: DMSAEModel, harvester: Harvester, args: BrowseArguments) -> FeatureStatistics:
    """One streaming pass over `browse_tokens` positions of `split`: the statistics of every latent."""
    sae.eval()
    stats = FeatureStatistics(sae.config.dict_size, args.top_contexts, args.context_before + 1 + args.context_after)
    positions = harvester.positions()
    batches = sequence_batches(
        harvester.source, args.split, harvester.packing, StreamPosition(), harvester.args.lm_batch_size
    )
    progress = tqdm(total=args.browse_tokens, desc="browsing", unit="tok", unit_scale=True)
    for batch in batches:
        input_ids = batch.input_ids.to(harvester.lm.device)
        acts = harvester.layer(input_ids)
        keep = positions.mask(input_ids, acts)
        windows, rows = context_windows(batch.input_ids, keep.cpu(), args.context_before, args.context_after)
        latents = sae.encode_sparse(acts[keep].to(sae.device)).to("cpu")
        stats.update(latents, windows, rows)
        stats.sequences += len(batch.input_ids)
        progress.update(latents.shape[0])
        if stats.rows >= args.browse_tokens:
            break
    progress.close()
    return stats


@dataclass
class LogitEffects:
    """What latents' decoder directions do through the unembedding (`W_dec[j] · W_U`, the final norm left out): per
    latent the `count` tokens promoted and suppressed most, with their logits, and with `bins` a histogram of its
    logits over the whole vocabulary (counts and bin centres); rows of latents not asked for hold -1 and 0."""

    promoted: torch.Tensor
    promoted_logits: torch.Tensor
    suppressed: torch.Tensor
    suppressed_logits: torch.Tensor
    histogram: torch.Tensor | None = None
    histogram_centres: torch.Tensor | None = None


@torch.no_grad()
def logit_effects(
    sae: DMSAEModel, unembedding: torch.Tensor, count: int, latents: list[int], chunk: int = 1024, bins: int = 0
) -> LogitEffects:
    """`LogitEffects` of `latents` through `unembedding`: at 65 536 latents and a 256 000-token vocabulary all of
    them cost 77 TFLOP, so the browser asks for the latents it writes pages (or exports) for."""
    n = sae.config.dict_size
    promoted = torch.full((n, count), -1, dtype=torch.long)
    suppressed, promoted_logits = promoted.clone(), torch.zeros(n, count)
    suppressed_logits = promoted_logits.clone()
    histogram = torch.zeros(n, bins, dtype=torch.long) if bins else None
    centres = torch.zeros(n, bins) if bins else None
    weights = unembedding.float()
    index = torch.tensor(latents, dtype=torch.long)
    for rows in index.split(chunk):
        logits = sae.W_dec[rows.to(sae.device)].float().to(weights.device) @ weights.T
        top, bottom = logits.topk(count, dim=1), (-logits).topk(count, dim=1)
        promoted[rows], promoted_logits[rows] = top.indices.cpu(), top.values.cpu()
        suppressed[rows], suppressed_logits[rows] = bottom.indices.cpu(), -bottom.values.cpu()
        if not bins:
            continue
        for row, latent_logits in zip(rows.tolist(), logits.cpu(), strict=True):
            low, high = float(latent_logits.min()), float(latent_logits.max())
            histogram[row] = torch.histc(latent_logits, bins, low, high).long()
            centres[row] = low + (high - low) / bins * (torch.arange(bins) + 0.5)
    return LogitEffects(promoted, promoted_logits, suppressed, suppressed_logits, histogram, centres)


@dataclass
class LatentInfo:
    """What the index and a latent page say about one latent."""

    index: int
    latent_id: str
    core: bool
    frequency: float
    max_activation: float
    score: float | None = None
    cycles: list[int] = field(default_factory=list)


def latent_infos(sae: DMSAEModel, stats: FeatureStatistics, cores: list[DMSAECore]) -> list[LatentInfo]:
    """Every latent, the core first (by attribution score when a core gives one), then by firing frequency."""
    ids = sae.config.latent_ids()
    scores, cycles = {}, {}
    for core in cores:
        for latent_id, score in zip(core.latent_ids, core.scores.tolist(), strict=True):
            scores[latent_id] = score
            cycles.setdefault(latent_id, set()).add(core.provenance.get("cycle"))
    frequency = (stats.fired.double() / max(stats.rows, 1)).tolist()
    maxima = stats.values[0].tolist() if len(stats.values) else [0.0] * len(ids)
    infos = [
        LatentInfo(
            j,
            ids[j],
            j < sae.config.core_size,
            frequency[j],
            maxima[j],
            scores.get(ids[j]),
            sorted(c for c in cycles.get(ids[j], ()) if c is not None),
        )
        for j in range(len(ids))
    ]
    return sorted(infos, key=lambda i: (not i.core, -(i.score or 0.0), -i.frequency))


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; }
th { cursor: pointer; background: #f3f3f3; } .core { color: #a0522d; font-weight: bold; }
.context { font-family: monospace; white-space: pre-wrap; margin: 4px 0; padding: 4px; border: 1px solid #eee; }
.tok { border-radius: 2px; } .tokens span { margin-right: 6px; font-family: monospace; }
"""

INDEX_SCRIPT = """
const table = document.getElementById("latents");
const rows = Array.from(table.tBodies[0].rows);
function apply() {
  const text = document.getElementById("filter").value.toLowerCase();
  const coreOnly = document.getElementById("core-only").checked;
  let shown = 0;
  for (const row of rows) {
    const visible = row.textContent.toLowerCase().includes(text) && (!coreOnly || row.dataset.core === "1");
    row.style.display = visible ? "" : "none";
    shown += visible;
  }
  document.getElementById("shown").textContent = shown + " of " + rows.length + " latents";
}
table.tHead.addEventListener("click", (event) => {
  const column = event.target.cellIndex;
  const descending = table.dataset.sorted !== String(column);
  table.dataset.sorted = descending ? String(column) : "";
  rows.sort((a, b) => {
    const x = a.cells[column].dataset.value ?? a.cells[column].textContent;
    const y = b.cells[column].dataset.value ?? b.cells[column].textContent;
    const order = isNaN(x) || isNaN(y) ? x.localeCompare(y) : Number(x) - Number(y);
    return descending ? -order : order;
  });
  for (const row of rows) table.tBodies[0].appendChild(row);
});
document.getElementById("filter").addEventListener("input", apply);
document.getElementById("core-only").addEventListener("change", apply);
apply();
"""


def _page(title: str, body: str, script: str = "") -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{script}</script>\n</body></html>\n"
    )


def _tokens(tokenizer, ids) -> list[str]:
    """The tokens of `ids`, leaving out -1 (not computed)."""
    return [tokenizer.decode([int(i)]) for i in ids if i >= 0]


def _histogram_svg(counts: list[int]) -> str:
    width, height, top = 12, 80, max(max(counts), 1)
    bars = "".join(
        f'<rect x="{i * width}" y="{height - height * c / top:.1f}" width="{width - 2}" '
        f'height="{height * c / top:.1f}" fill="#4682b4"><title>10^{math.log10(BIN_EDGES[i]):.1f}–'
        f"10^{math.log10(BIN_EDGES[i + 1]):.1f}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    return f'<svg class="histogram" width="{width * len(counts)}" height="{height}">{bars}</svg>'


def write_site(
    folder: str | Path,
    sae: DMSAEModel,
    tokenizer,
    stats: FeatureStatistics,
    infos: list[LatentInfo],
    promoted: torch.Tensor,
    suppressed: torch.Tensor,
    *,
    max_pages: int | None = None,
    title: str = "",
) -> Path:
    """Write `index.html` and one page per latent (the first `max_pages` of the index's order) into `folder`, as a
    whole: the site is written beside it and replaces an earlier site there, so no page of another model stays."""
    folder = check_site_dir(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_pages(staging, sae, tokenizer, stats, infos, promoted, suppressed, max_pages, title)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def check_site_dir(folder: str | Path) -> Path:
    """`folder` if a site may be written there: it does not exist, is empty or holds an earlier site, which the new
    one replaces (a folder of other files is never deleted)."""
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / "index.html").is_file())):
        raise FileExistsError(f"{folder} holds files but no site (no index.html): choose another site_dir")
    return folder


def _write_pages(folder: Path, sae, tokenizer, stats, infos, promoted, suppressed, max_pages, title) -> None:
    (folder / "latents").mkdir(parents=True)
    title = title or f"DMSAE features: {sae.config.base_model} block {sae.config.hook_layer} {sae.config.hook_name}"
    pages = {info.index for info in infos[:max_pages]}
    rows = []
    for info in infos:
        name = f'<a href="latents/{info.index}.html">{info.index}</a>' if info.index in pages else str(info.index)
        top = html.escape(" ".join(_tokens(tokenizer, promoted[info.index, :3])))
        score = f"{info.score:.4g}" if info.score is not None else ""
        rows.append(
            f'<tr data-core="{int(info.core)}"><td data-value="{info.index}">{name}</td>'
            f'<td class="{"core" if info.core else ""}">{html.escape(info.latent_id)}</td>'
            f'<td>{"core" if info.core else ""}</td><td data-value="{info.score or 0}">{score}</td>'
            f'<td data-value="{info.frequency}">{info.frequency:.4f}</td>'
            f'<td data-value="{info.max_activation}">{info.max_activation:.3g}</td><td>{top}</td></tr>'
        )
    body = (
        f"<h1>{html.escape(title)}</h1><p>{stats.rows} token positions read; {sae.config.core_size} core "
        f'latents first. Click a column to sort.</p><p><input id="filter" placeholder="filter"> '
        f'<label><input type="checkbox" id="core-only"> core only</label> <span id="shown"></span></p>'
        '<table id="latents"><thead><tr><th>latent</th><th>id</th><th>core</th><th>attribution score</th>'
        "<th>frequency</th><th>max activation</th><th>promotes</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    (folder / "index.html").write_text(_page(title, body, INDEX_SCRIPT))
    for info in infos:
        if info.index in pages:
            (folder / "latents" / f"{info.index}.html").write_text(
                _latent_page(info, tokenizer, stats, promoted, suppressed)
            )
    (folder / "latents.json").write_text(json.dumps([vars(i) for i in infos]))


def _latent_page(info: LatentInfo, tokenizer, stats: FeatureStatistics, promoted, suppressed) -> str:
    j = info.index
    contexts = []
    for k in range(len(stats.values)):
        if stats.values[k, j] <= 0:
            break
        peak = float(stats.values[k, j])
        spans = "".join(
            f'<span class="tok" style="background: rgba(255, 140, 0, {min(float(a) / peak, 1.0):.2f})" '
            f'title="{float(a):.3g}">{html.escape(tokenizer.decode([int(t)]))}</span>'
            for t, a in zip(stats.tokens[k, j].tolist(), stats.window_acts[k, j], strict=True)
            if t >= 0
        )
        contexts.append(f'<div class="context">{spans}</div>')
    facts = [
        f"id <b>{html.escape(info.latent_id)}</b>",
        "core latent" if info.core else "non-core latent",
        f"fires on {info.frequency:.4%} of positions",
        f"max activation {info.max_activation:.3g}",
    ]
    if info.score is not None:
        facts.append(f"attribution score {info.score:.4g}")
    if info.cycles:
        facts.append("selected in cycles " + ", ".join(map(str, info.cycles)))
    promotes = "".join(f"<span>{html.escape(t)}</span>" for t in _tokens(tokenizer, promoted[j]))
    suppresses = "".join(f"<span>{html.escape(t)}</span>" for t in _tokens(tokenizer, suppressed[j]))
    body = (
        f'<p><a href="../index.html">all latents</a></p><h1>Latent {j}</h1><p>{"; ".join(facts)}</p>'
        f"<h2>Top-activating contexts</h2>{''.join(contexts) or '<p>never fired in the text read</p>'}"
        f"<h2>Activation histogram</h2>{_histogram_svg(stats.histogram[j].tolist())}"
        f"<p>non-zero activations on log bins from 10^-3 to 10^2</p>"
        f'<h2>Decoder direction through the unembedding</h2><p class="tokens">promotes: {promotes}</p>'
        f'<p class="tokens">suppresses: {suppresses}</p>'
    )
    return _page(f"Latent {j} ({info.latent_id})", body)


NEURONPEDIA_LOGIT_BINS = 20


def statistics_about(sae: DMSAEModel, args: BrowseArguments, activations: ActivationArguments) -> dict:
    """What a model's statistics depend on: its weights, the LM, hook and text, and the browser's settings."""
    from ..data.language_model import weights_digest

    return {
        "model": weights_digest(sae),
        "base_model": activations.model_name_or_path,
        "hook_layer": activations.hook_layer,
        "hook_name": activations.hook_name,
        "dataset": activations.dataset_name_or_path,
        "split": args.split,
        "context_length": activations.context_length,
        "prepend_bos": activations.prepend_bos,
        **{name: getattr(args, name) for name in ("browse_tokens", "top_contexts", "context_before", "context_after")},
    }


def saved_statistics(folder: Path, about: dict) -> FeatureStatistics | None:
    """The statistics saved in `folder` if they were read as `about` says; None if there are none or others."""
    if not (folder / ABOUT_FILE).is_file():
        return None
    stats, saved = FeatureStatistics.load(folder)
    if any(saved.get(key) != value for key, value in about.items()):
        logger.info("%s holds statistics of another model, text or settings: the text is read again", folder)
        return None
    logger.info("Statistics read back from %s (%d positions); the text is not read again", folder, stats.rows)
    return stats


def browse(args: BrowseArguments, activations: ActivationArguments) -> Path:
    """Read the text once (or read the saved statistics back) and write the site, the statistics and, if asked,
    the Neuronpedia export (see the module docstring)."""
    from ..data.language_model import load_language_model
    from .hub import resolve_folder
    from .neuronpedia import write_neuronpedia

    check_site_dir(args.site_dir)  # before the text is read
    sae = DMSAEModel.from_pretrained(resolve_folder(args.model))
    cores = [DMSAECore.from_pretrained(resolve_folder(c)) for c in args.cores]
    lm, tokenizer = load_language_model(
        activations.model_name_or_path,
        revision=activations.model_revision,
        dtype=activations.lm_dtype,
        hook_layer=activations.hook_layer,
        context_length=activations.context_length,
    )
    if sae.config.hook_layer is not None and sae.config.hook_layer != activations.hook_layer:
        raise ValueError(f"the model reads layer {sae.config.hook_layer}; hook_layer={activations.hook_layer} given")
    about = statistics_about(sae, args, activations)
    statistics_dir = Path(args.statistics_dir or Path(args.site_dir) / "statistics")
    stats = saved_statistics(statistics_dir, about)
    if stats is None:
        stats = collect(sae.to(lm.device), Harvester(activations, lm, tokenizer), args)
    infos = latent_infos(sae, stats, cores)
    paged = [info.index for info in infos[: args.max_pages]]
    exported = list(range(sae.config.dict_size)) if args.neuronpedia_dir else paged
    bins = NEURONPEDIA_LOGIT_BINS if args.neuronpedia_dir else 0
    effects = logit_effects(sae, lm.get_output_embeddings().weight, args.logit_tokens, exported, bins=bins)
    folder = write_site(
        args.site_dir, sae, tokenizer, stats, infos, effects.promoted, effects.suppressed, max_pages=args.max_pages
    )
    stats.save(statistics_dir, about)  # after the site, which replaces its folder as a whole
    if args.neuronpedia_dir:
        read = {
            "dataset": activations.dataset_name_or_path,
            "n_prompts_total": stats.sequences,
            "n_tokens_in_prompt": activations.context_length,
        }
        write_neuronpedia(
            args.neuronpedia_dir, sae, tokenizer, stats, effects, read, args.context_before, args.neuronpedia_set
        )
        logger.info("Neuronpedia export written to %s", args.neuronpedia_dir)
    logger.info("Feature browser written to %s (%d positions read)", folder / "index.html", stats.rows)
    return folder
