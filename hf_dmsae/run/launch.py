"""How a script starts and ends under `accelerate launch`: its arguments parsed from `[config.json] [--field value
…]`, and every process taken down in order at the end."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from transformers import HfArgumentParser

from ..utils.integrity import read_json


def end_processes() -> None:
    """The last call of a script: every process waits for the main one (which evaluates, writes and pushes alone),
    then the process group is taken down in order, so no process exits while another still talks to it."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


def aliases(argument: dataclasses.Field) -> list[str]:
    """The other flags `HfArgumentParser` takes for a field (its metadata's `aliases`), as JSON keys too."""
    names = argument.metadata.get("aliases", [])
    return [names] if isinstance(names, str) else list(names)


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None, shared: tuple = ()) -> tuple:
    """Parse `[config.json] [--field value …]`: the JSON file's fields, overridden by the command line. JSON fields
    of the `shared` dataclasses (other scripts' arguments in a shared config file) are skipped; unknown ones are
    an error. A list field given as `none` is empty."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)}
    known |= {a.lstrip("-") for cls in dataclass_types for f in dataclasses.fields(cls) for a in aliases(f)}
    skipped = {f.name for cls in shared for f in dataclasses.fields(cls)} - known
    from_file: list[str] = []
    if argv and argv[0].endswith(".json"):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        for key, value in read_json(path).items():
            if value is None or key in skipped:
                continue
            if key not in known:
                raise ValueError(f"{path}: {key!r} is not an argument of this script")
            values = value if isinstance(value, list) else [value]
            from_file += [f"--{key}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values or ["none"])]
    namespace = parser.parse_args(from_file + argv)
    parsed = []
    for cls in dataclass_types:
        values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}
        for name, value in values.items():
            if isinstance(value, list) and [str(v).lower() for v in value] == ["none"]:
                values[name] = []
        parsed.append(cls(**values))
    return tuple(parsed)
