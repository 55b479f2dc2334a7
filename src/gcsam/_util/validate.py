"""Argument checks shared by the library and the toolkit: each error names the argument, what
it must be, and what it got."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_choice(
    name: str, value: Any, choices: Iterable[str], error: type[Exception] = ValueError
) -> str:
    """``value`` if it is one of ``choices``; raise ``error`` naming ``name`` otherwise."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_int(
    name: str, value: Any, minimum: int | None, error: type[Exception] = ValueError
) -> int:
    """``value`` if it is an integer (not a bool) ``>= minimum`` (any, when ``minimum`` is None);
    raise ``error`` otherwise."""
    below = minimum is not None and isinstance(value, int) and value < minimum
    if isinstance(value, bool) or not isinstance(value, int) or below:
        bound = "" if minimum is None else f" >= {minimum}"
        raise error(f"{name} must be an integer{bound}, got {value!r}")
    return value


def check_number(
    name: str, value: Any, *, zero: bool = False, error: type[Exception] = ValueError
) -> float:
    """``value`` if it is a finite positive number (or ``>= 0`` with ``zero``)."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        kind = "non-negative" if zero else "positive"
        raise error(f"{name} must be a finite {kind} number, got {value!r}")
    return value
