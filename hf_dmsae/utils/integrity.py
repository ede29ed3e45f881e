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


NUMBER = (int, float)
"""A JSON number (a bool is not one)."""


class Each:
    """A schema of `read_json`: a JSON object each of whose values has `schema` (`of=(list,)`: a list each of whose
    items has it)."""

    def __init__(self, schema, of: tuple[type, ...] = (dict,)):
        self.schema, self.of = schema, of


def schema_problem(value, schema, where: str = "") -> str | None:
    """What is wrong with `value` against `schema` (None: nothing), naming the key path. A schema is a type or a
    tuple of types; a dict (an object holding each key, one ending in `?` optional, whose value has its schema); or
    an `Each`."""
    if isinstance(schema, Each):
        if not isinstance(value, schema.of):
            return f"{where!r} is a JSON {_json_type(value)}, not {_describe(schema.of)}"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return next((p for k, v in items if (p := schema_problem(v, schema.schema, _key(where, k)))), None)
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where!r} is a JSON {_json_type(value)}, not an object" if where else None
        for key, inner in schema.items():
            name = key.removesuffix("?")
            if name not in value:
                if not key.endswith("?"):
                    return f"no {_key(where, name)!r}"
            elif problem := schema_problem(value[name], inner, _key(where, name)):
                return problem
        return None
    kinds = schema if isinstance(schema, tuple) else (schema,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        return f"{where!r} is a JSON {_json_type(value)}, not {_describe(kinds)}"
    return None


def _key(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _describe(kinds: tuple) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def read_json(path: str | os.PathLike, required: dict | None = None, remedy: str = ""):
    """A JSON file's content, or an `IntegrityError` that names the file and says what is wrong with it (and
    `remedy`, what to do about it: deleting is no advice for a file that holds someone's only results). With
    `required` (a schema of `schema_problem`), the content must be an object matching it."""
    path = Path(path)
    advice = f"; {remedy}" if remedy else ""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IntegrityError(f"{path} is damaged or truncated ({error}){advice}") from error
    return data if required is None else check_record(path, data, required, remedy)


def check_record(path: str | os.PathLike, data, schema: dict, remedy: str = ""):
    """`data`, read from `path`, after checking that it is an object matching `schema` (`schema_problem`); else an
    `IntegrityError` naming the file, the key path and `remedy`."""
    advice = f"; {remedy}" if remedy else ""
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} holds a JSON {_json_type(data)}, not an object{advice}")
    if problem := schema_problem(data, schema):
        raise IntegrityError(
            f"{path} has {problem}{advice}" if problem.startswith("no ") else f"{path}: {problem}{advice}"
        )
    return data


def inside(folder: str | os.PathLike, relative: str) -> Path:
    """`folder / relative`, refused where a recorded path (`..`, an absolute one) leaves `folder`."""
    folder = Path(folder)
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise IntegrityError(f"the recorded path {relative!r} leaves the run folder {folder}")
    return path


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
