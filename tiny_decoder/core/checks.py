"""One way to check a config value: ``check(field, value, predicate, wanted)`` raises :class:`ConfigError`
with ``<field> must be <wanted>, got <value>`` (and a hint), so every bad value reads the same wherever it is
checked. The predicates below are the ranges the project's options use; ``check_int`` and ``check_number`` are
the two shapes most fields take.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tiny_decoder.core.errors import ConfigError

T = TypeVar("T")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive(value: Any) -> bool:
    return is_number(value) and value > 0


def is_non_negative(value: Any) -> bool:
    return is_number(value) and value >= 0


def is_count(value: Any) -> bool:
    """An integer >= 0."""
    return is_integer(value) and value >= 0


def is_positive_int(value: Any) -> bool:
    return is_integer(value) and value > 0


def is_probability(value: Any) -> bool:
    """A rate in [0, 1) (dropout, drop probability)."""
    return is_number(value) and 0 <= value < 1


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_betas(value: Any) -> bool:
    """Adam's two betas, each in [0, 1)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return False
    betas = list(value)
    return len(betas) == 2 and all(is_probability(b) for b in betas)


def check(field: str, value: T, predicate: Callable[[Any], bool], wanted: str, hint: str = "") -> T:
    """``value`` if ``predicate(value)``; else ConfigError ``<field> must be <wanted>, got <value><hint>``."""
    if not predicate(value):
        raise ConfigError(f"{field} must be {wanted}, got {value!r}{hint}")
    return value


def check_int(field: str, value: Any, minimum: int = 0, hint: str = "") -> int:
    """An integer >= ``minimum`` (a bool is not an integer here)."""
    return check(field, value, lambda v: is_integer(v) and v >= minimum, f"an integer >= {minimum}", hint)


def check_number(
    field: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A finite number in the interval ``[low, high]`` (an end ``None`` is unbounded; ``*_open`` excludes it)."""
    check(field, value, is_number, "a finite number", hint)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise ConfigError(f"{field} must be in {interval(low, high, low_open, high_open)}, got {value!r}{hint}")
    return value


def interval(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """``[0, 1)``-style text of an interval; an unbounded end reads as ``inf``."""
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def parse_integers(field: str, text: str, hint: str = "") -> list[int]:
    """``"1 2 4"`` or ``"1,2,4"`` -> ``[1, 2, 4]``; ConfigError ``<field>='...': expected integers separated by
    spaces<hint>`` otherwise."""
    try:
        return [int(token) for token in str(text).replace(",", " ").split()]
    except ValueError as error:
        raise ConfigError(f"{field}={text!r}: expected integers separated by spaces{hint}") from error
