"""On-disk caches of harvested rows: activations for training and evaluation, activation–gradient pairs for
attribution. A cache is a folder of safetensors shards (one tensor per name, `[rows, d]`, each shard carrying the
digest of its bytes) and `cache.json`, written last: what the rows are (the identity they were made for), the
shards, and whatever the harvest recorded (e.g. where in the token stream it ended). Rows are memory-mapped. A
folder without a manifest, a damaged shard or a cache made for other rows is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from ..utils.integrity import IntegrityError, check_safetensors_size, load_tensors, read_json, save_tensors

logger = logging.getLogger(__name__)

MANIFEST = "cache.json"
SHARD_ROWS = 65_536
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def identity_difference(found: dict, wanted: dict) -> dict:
    """`{field: (found, wanted)}` for every field where two identities differ."""
    return {k: (found.get(k), wanted.get(k)) for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k)}


def _memory_map(path: Path, name: str) -> np.memmap:
    header_len, header = check_safetensors_size(path)
    if name not in header:
        raise IntegrityError(f"{path} holds no tensor {name!r}")
    info = header[name]
    offset = 8 + header_len + info["data_offsets"][0]
    return np.memmap(path, dtype=_NUMPY_DTYPES[info["dtype"]], mode="r", offset=offset, shape=tuple(info["shape"]))


class TensorCache(torch.utils.data.Dataset):
    """A finished cache: `len(cache)` rows of the named tensors, gathered by row index."""

    names: tuple[str, ...] = ("activations",)

    def __init__(self, path: str | os.PathLike, expected_identity: dict | None = None, verify: bool = True):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.path} is not a finished cache (no {MANIFEST})")
        self.manifest = read_json(self.path / MANIFEST, {"identity": dict, "shards": list, "d_in": int, "dtype": str})
        if expected_identity is not None and self.manifest["identity"] != expected_identity:
            raise ValueError(
                f"The cache at {self.path} was made for other rows; (cached, wanted): "
                f"{identity_difference(self.manifest['identity'], expected_identity)}. Use another cache folder or "
                "delete this one."
            )
        if verify:
            for shard in self.manifest["shards"]:
                load_tensors(self.path / shard)  # the digest of every shard's bytes
        self._shards = {
            name: [_memory_map(self.path / s, name) for s in self.manifest["shards"]] for name in self.names
        }
        self._dtype = getattr(torch, self.manifest["dtype"])
        sizes = torch.tensor([0] + [len(s) for s in self._shards[self.names[0]]])
        self._starts = sizes.cumsum(0)
        self.d_in = int(self.manifest["d_in"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def extra(self) -> dict:
        """What the harvest recorded beside the rows."""
        return self.manifest.get("extra", {})

    def gather(self, name: str, indices) -> torch.Tensor:
        """Rows `indices` of tensor `name`, `[len(indices), d]`."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for a cache of {len(self)} rows")
        shard = torch.searchsorted(self._starts, index, right=True) - 1
        out = torch.empty(len(index), self.d_in, dtype=self._dtype)
        for s in shard.unique().tolist():
            selected = shard == s
            rows = np.ascontiguousarray(self._shards[name][s][(index[selected] - self._starts[s]).numpy()])
            rows = torch.from_numpy(rows)
            out[selected] = rows.view(torch.bfloat16) if self._dtype == torch.bfloat16 else rows
        return out

    def rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows `start … stop-1` of every tensor."""
        indices = torch.arange(start, min(stop, len(self)))
        return {name: self.gather(name, indices) for name in self.names}

    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        identity: dict,
        blocks: Iterable[dict[str, torch.Tensor]],
        rows: int | None,
        dtype: str,
        extra=None,
    ):
        """Open the cache at `path` if it holds these rows, else write the first `rows` rows of `blocks` (all of
        them for `rows=None`) there.
        Shards go to a staging folder renamed into place after the manifest is written, so a crash never leaves a
        cache that looks whole; `extra()` (called after the rows are written) is recorded in the manifest."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):  # two runs sharing a cache folder build each cache once
            if (path / MANIFEST).is_file():
                return cls(path, expected_identity=identity)
            if path.exists() and any(path.iterdir()):
                raise ValueError(f"{path} exists but is not a finished cache; delete it or choose another folder")
            tag = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
            staging = path.with_name(f"{path.name}.partial-{tag}")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            shards, pending, written, d_in = [], {}, 0, None
            limit = rows if rows is not None else float("inf")

            def flush(final: bool) -> None:
                nonlocal pending
                while len(pending[cls.names[0]]) >= SHARD_ROWS or (final and len(pending[cls.names[0]])):
                    name = f"shard-{len(shards):05d}.safetensors"
                    save_tensors(
                        {n: t[:SHARD_ROWS].to(getattr(torch, dtype)) for n, t in pending.items()}, staging / name
                    )
                    shards.append(name)
                    pending = {n: t[SHARD_ROWS:] for n, t in pending.items()}

            try:
                for block in blocks:
                    take = int(min(limit - written, len(block[cls.names[0]])))
                    pending = {
                        n: torch.cat([pending[n], block[n][:take]]) if pending else block[n][:take] for n in cls.names
                    }
                    written += take
                    d_in = pending[cls.names[0]].shape[1]
                    flush(final=False)
                    if written >= limit:
                        break
                if pending:
                    flush(final=True)
                if rows is not None and written < rows:
                    raise ValueError(f"the source ended after {written} of the {rows} rows asked for {path}")
                if written == 0:
                    raise ValueError(f"the source gave no rows for {path}")
            except BaseException:  # a failed or interrupted harvest leaves nothing behind
                shutil.rmtree(staging, ignore_errors=True)
                raise
            manifest = {
                "identity": identity,
                "names": list(cls.names),
                "shards": shards,
                "rows": written,
                "d_in": d_in,
                "dtype": dtype,
                "extra": extra() if extra else {},
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if path.exists():
                path.rmdir()
            os.replace(staging, path)
            logger.info("Cache written to %s (%d rows)", path, written)
            return cls(path, expected_identity=identity, verify=False)


class ActivationCache(TensorCache):
    """Activations for training or evaluation, as the Trainer reads them: indexing by a list of rows
    (`__getitems__`, used by the DataLoader) gathers a whole batch at once."""

    names = ("activations",)

    def __getitems__(self, indices) -> torch.Tensor:
        return self.gather("activations", indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"activations": self.gather("activations", [index])[0]}

    def sample(self, n: int) -> torch.Tensor:
        """The first `n` rows (already shuffled when the cache was written)."""
        return self.gather("activations", range(min(n, len(self))))

    def batches(self, batch_size: int):
        """Consecutive batches of rows (raw activations), for evaluation."""
        for start in range(0, len(self), batch_size):
            yield self.rows(start, start + batch_size)["activations"]


class AttributionCache(TensorCache):
    """Activation–gradient pairs `(x_u, g_u)` of the attribution split, in the shuffled order scoring reads them."""

    names = ("activations", "gradients")
