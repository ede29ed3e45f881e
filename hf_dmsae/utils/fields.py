"""`fields_of`: a dataclass takes another's fields whole (type, default, help), so that a setting two argument sets
both need is declared once."""

import dataclasses


def fields_of(source, *names: str, defaults: dict | None = None):
    """Give a dataclass being defined the fields `names` of the dataclass `source`, with their types, help and
    defaults (`defaults` override some)."""
    source_fields = {f.name: f for f in dataclasses.fields(source)}
    defaults = {name: source_fields[name].default for name in names} | (defaults or {})

    def add(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        cls.__annotations__ = {name: source_fields[name].type for name in names} | own
        for name in names:
            setattr(cls, name, dataclasses.field(default=defaults[name], metadata=source_fields[name].metadata))
        return cls

    return add
