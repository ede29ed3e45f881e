"""Files a run writes and reads back, written so that a crash never leaves half a file that looks whole and checked so
that a damaged file is refused with its name rather than read.

- safetensors files carry a digest of their tensors' bytes in their own metadata (`save_tensors` / `load_tensors`);
- other files (a model's weights, a checkpoint's files) are recorded by SHA-256 (`file_sha256`, `checksums`);
- JSON records are written through a temporary file renamed into place and read with an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DIGEST_KEY = "hf_dmsae_digest"


class IntegrityError(ValueError):
    """A file a run reuses is damaged or is not the one that was written."""


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """`safetensors` file with the digest of its tensors in its metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with saving(path):
        save_file(tensors, str(path), metadata={**(metadata or {}), DIGEST_KEY: tensor_digest(tensors)})


def check_safetensors_size(path: str | os.PathLike) -> tuple[int, dict]:
    """The header length and header of a safetensors file, after checking the file holds all the data it announces
    (a truncated file fails here, naming itself)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            if 8 + header_len > size:  # read nothing a damaged length announces (2^40 bytes would exhaust memory)
                raise ValueError(f"its header announces {header_len} bytes, the file has {size}")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as error:
        raise IntegrityError(f"{path} is not a readable safetensors file ({error})") from error
    end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise IntegrityError(f"{path} is truncated: {path.stat().st_size} bytes, {8 + header_len + end} announced")
    return header_len, header


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a file written by `save_tensors`, after checking their digest."""
    check_safetensors_size(path)
    with safe_open(str(path), framework="pt", device=device) as f:
        expected = (f.metadata() or {}).get(DIGEST_KEY)
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if expected is None:
        raise IntegrityError(f"{path} carries no digest: it was not written by hf_dmsae or was rewritten")
    if tensor_digest(tensors) != expected:
        raise IntegrityError(f"{path} is damaged: its tensors no longer match the digest written with them")
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse weights with NaN or inf in them, naming the file and the tensor: one such value in an encoder row
    wins every BatchTopK slot and turns every metric into NaN without failing anything."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not (finite := torch.isfinite(tensor)).all():
            raise IntegrityError(f"{path}: tensor {name!r} holds {int((~finite).sum())} NaN or infinite values")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(folder: str | os.PathLike, names: list[str] | None = None) -> dict[str, str]:
    """SHA-256 of the files of `folder` (all regular files, or `names`)."""
    folder = Path(folder)
    names = names if names is not None else sorted(p.name for p in folder.iterdir() if p.is_file())
    return {name: file_sha256(folder / name) for name in names}


def verify_checksums(folder: str | os.PathLike, expected: dict[str, str]) -> None:
    """Raise `IntegrityError` naming the first file of `folder` that is missing or differs from `expected`."""
    folder = Path(folder)
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing")
        if file_sha256(path) != digest:
            raise IntegrityError(f"{path} changed since it was written (SHA-256 differs)")


def write_json_atomically(path: str | os.PathLike, data) -> None:
    """Write `data` as JSON through a temporary file renamed into place: a crash never leaves half a record."""
    path = Path(path)
    staging = path.with_name(path.name + ".tmp")
    with saving(path):
        staging.write_text(json.dumps(data, indent=2))
        os.replace(staging, path)


def read_json(path: str | os.PathLike, required: dict[str, type | tuple[type, ...]] | None = None):
    """A JSON file's content, or an error that names the file and says what is wrong with it. With `required`, the
    content must be an object holding each of those keys with a value of the given type."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IntegrityError(f"{path} is damaged or truncated ({error}); delete it to start over") from error
    if required is None:
        return data
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} holds a JSON {type(data).__name__}, not an object; delete it to start over")
    for key, kind in required.items():
        if key not in data:
            raise IntegrityError(f"{path} has no {key!r}; delete it to start over")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise IntegrityError(
                f"{path}: {key!r} is a JSON {type(data[key]).__name__}, not what this file holds; "
                "delete it to start over"
            )
    return data


WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "iostream", "I/O error")
"""How torch's writer (a `RuntimeError`) and safetensors' (a `SafetensorError`) report an OS failure to write."""


@contextmanager
def saving(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a failed write (a full disk, a file-size limit, a read-only folder) as an `OSError` that names the
    file or folder being written and the cause; torch's and safetensors' own errors name neither."""
    try:
        yield
    except OSError as error:
        if str(path) in str(error):
            raise
        raise OSError(
            error.errno, f"could not write {path}: {error.strerror or error} ({_free_space(Path(path))})"
        ) from error
    except Exception as error:
        if not any(marker in str(error) for marker in WRITE_FAILURES):
            raise
        raise OSError(f"could not write {path}: {error} ({_free_space(Path(path))})") from error


def _free_space(path: Path) -> str:
    """How much room is left on the disk of `path` (or the nearest folder above it that exists)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    return "no space left on its disk" if free < 1 << 20 else f"{free / 2**20:.0f} MiB free on its disk"
