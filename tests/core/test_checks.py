"""``core.checks``: one message shape for every bad value, and the ranges the options use."""

from __future__ import annotations

import math

import pytest

from tiny_decoder.core.checks import check, check_int, check_number, is_betas, is_count, is_probability
from tiny_decoder.core.errors import ConfigError


def test_check_returns_the_value_or_names_field_wanted_and_value() -> None:
    assert check("optimizer.lr", 0.1, lambda v: v > 0, "a positive number") == 0.1
    with pytest.raises(ConfigError, match=r"^optimizer.lr must be a positive number, got -1; try 1e-3$"):
        check("optimizer.lr", -1, lambda v: v > 0, "a positive number", hint="; try 1e-3")


@pytest.mark.parametrize(("value", "ok"), [(0, True), (3, True), (-1, False), (True, False), (2.0, False)])
def test_check_int_refuses_bools_floats_and_values_below_the_minimum(value: object, ok: bool) -> None:
    if ok:
        assert check_int("data.n", value) == value
    else:
        with pytest.raises(ConfigError, match=rf"^data.n must be an integer >= 0, got {value!r}$"):
            check_int("data.n", value)


def test_check_number_intervals() -> None:
    assert check_number("x", 1.0, 0, 1) == 1.0
    with pytest.raises(ConfigError, match=r"x must be in \[0, 1\), got 1.0"):
        check_number("x", 1.0, 0, 1, high_open=True)
    with pytest.raises(ConfigError, match=r"x must be in \(0, inf\), got 0"):
        check_number("x", 0, 0, low_open=True)
    with pytest.raises(ConfigError, match="x must be a finite number, got nan"):
        check_number("x", math.nan)


def test_predicates() -> None:
    assert is_betas([0.9, 0.95]) and not is_betas([0.9]) and not is_betas("ab") and not is_betas([0.9, 1.0])
    assert is_probability(0.0) and not is_probability(1.0) and not is_probability(math.inf)
    assert is_count(0) and not is_count(-1) and not is_count(False)
