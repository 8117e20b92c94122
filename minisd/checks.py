"""Range checks for the config dataclasses, run in `__post_init__` before any module is built.

A config read from a file is input like any other: `"layers_per_block": 1000000` would build modules
for minutes, `"scaling_factor": 0` would decode every picture to black. Each check raises one
ValueError line naming the config, the field, the value and what was expected.
"""

from __future__ import annotations

import math


def check_int(config: str, field: str, value, lo: int, hi: int) -> None:
    """`value` is an int (not a bool) in lo..hi."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{config}.{field} = {value!r}; expected an integer in {lo}..{hi}")


def check_float(config: str, field: str, value, lo: float, hi: float, lo_open: bool = False) -> None:
    """`value` is a finite real number in [lo, hi] (or (lo, hi] with `lo_open`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise ValueError(f"{config}.{field} = {value!r}; expected a finite number in "
                         f"{'(' if lo_open else '['}{lo:g}, {hi:g}]")


def check_bool(config: str, field: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{config}.{field} = {value!r}; expected true or false")


def check_choice(config: str, field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{config}.{field} = {value!r}; expected one of {', '.join(map(repr, choices))}")


def check_levels(config: str, field: str, values, n_lo: int, n_hi: int) -> None:
    """`values` is a tuple of n_lo..n_hi entries (one per level)."""
    if not isinstance(values, tuple) or not n_lo <= len(values) <= n_hi:
        count = f"{n_lo}" if n_lo == n_hi else f"{n_lo}..{n_hi}"
        raise ValueError(f"{config}.{field} = {values!r}; expected a list of {count} entries (one per level)")


def as_tuple(config: str, field: str, value) -> tuple:
    """A JSON list (or tuple) as a tuple; anything else is a ValueError naming the field."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{config}.{field} = {value!r}; expected a list")
    return tuple(value)
