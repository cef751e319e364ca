"""Shared command-line behaviour: a bad input ends the program with one clear line and exit code 2.

Errors a user can fix (a config value, a missing file, a wrong checkpoint) are printed as
``error: <message>`` without a traceback (set ``TINY_DECODER_TRACEBACK=1`` to see it); anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console

from tiny_decoder.model.registry import ConfigError

T = TypeVar("T")

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)


def run_cli(function: Callable[..., T], *args: Any) -> T:
    try:
        return function(*args)
    except USER_ERRORS as error:
        if os.environ.get("TINY_DECODER_TRACEBACK"):
            raise
        Console(stderr=True).print(f"[bold red]error:[/bold red] {error}", highlight=False)
        sys.exit(2)
