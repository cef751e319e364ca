"""Shared command-line behaviour: a bad input ends the program with one clear line and exit code 2.

Errors a user can fix (a config value, a missing file, a wrong checkpoint) are printed as
``error: <message>`` without a traceback (set ``TINY_DECODER_TRACEBACK=1`` to see it), also when Hydra's
``instantiate`` wrapped them; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from rich.console import Console

from tiny_decoder.model.registry import ConfigError

T = TypeVar("T")

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)


def user_error(error: BaseException) -> BaseException | None:
    """The user-fixable error behind ``error`` (unwrapping Hydra's InstantiationException), or None."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, USER_ERRORS) else None


def run_cli(function: Callable[..., T], *args: Any) -> T:
    try:
        return function(*args)
    except (*USER_ERRORS, InstantiationException) as error:
        cause = user_error(error)
        if cause is None or os.environ.get("TINY_DECODER_TRACEBACK"):
            raise
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] {cause}", highlight=False)
        sys.exit(2)
