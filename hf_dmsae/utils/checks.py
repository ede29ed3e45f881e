"""Range checks of parsed arguments: every value is refused when it is parsed, naming the field and its rule, so that
a bad value never costs a harvest (hours at the paper's scale) before it fails, or passes to give a wrong result."""

from __future__ import annotations

import math
import re

_INTERVAL = re.compile(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])")


def _holds(value: float, rule: str) -> bool:
    """Whether `value` obeys `rule`: `>= a`, `> a`, or an interval `[a, b)` (NaN and infinity obey none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    low_bracket, low, high, high_bracket = _INTERVAL.fullmatch(rule).groups()
    above = value >= float(low) if low_bracket == "[" else value > float(low)
    below = value <= float(high) if high_bracket == "]" else value < float(high)
    return above and below


def check_ranges(args, **rules: str) -> None:
    """Raise `ValueError` for the first field of `args` that breaks its rule (`batch_size=">= 1"`, `q="(0, 1)"`);
    a list is checked item by item, None is left to mean its default."""
    for name, rule in rules.items():
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and not _holds(v, rule) for v in values):
            raise ValueError(f"{name}={value!r} is invalid: must {'be' if rule[0] == '>' else 'lie in'} {rule}")
