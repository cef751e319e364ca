"""The project's exception types and how they read: what a user can fix (``ConfigError``, ``CheckpointError``, a
missing file, ...), a run that ended early for a reason its message explains (``RunFailure``), ``user_error``
(the user-fixable cause behind an exception, unwrapping Hydra's instantiation wrapper) and ``one_line`` (its
message on one line). Command-line tools print a user error as one ``error:`` line; a run writes it as the last
line of its ``error.txt``."""

from __future__ import annotations

import sys

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class RunFailure(RuntimeError):
    """A run ended early for a reason its message explains (diverged, interrupted): one line, ``exit_code``."""

    exit_code = 1


class CheckpointError(ConfigError):
    """A checkpoint cannot be used: unreadable, truncated, not a tiny_decoder checkpoint, or not the model the
    config describes. The message names the file and the fix."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    FileNotFoundError,
    ValueError,
    MissingMandatoryValue,
    RunFailure,
)
LIGHTNING_ERRORS = "lightning.fabric.utilities.exceptions"  # MisconfigurationException: a Trainer option clash


def user_error_types() -> tuple[type[BaseException], ...]:
    """USER_ERRORS, plus Lightning's MisconfigurationException once Lightning is loaded (not imported here:
    the tools that do not train start faster without it)."""
    lightning = sys.modules.get(LIGHTNING_ERRORS)
    return (*USER_ERRORS, lightning.MisconfigurationException) if lightning is not None else USER_ERRORS


def user_error(error: BaseException) -> BaseException | None:
    """The user-fixable error behind ``error`` (unwrapping Hydra's InstantiationException), or None."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, user_error_types()) else None


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (OmegaConf's ``full_key:`` / ``object_type=`` details dropped)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, OmegaConfBaseException):
        lines = lines[:1]
    return " ".join(lines) or type(error).__name__
