"""The project's exception types: what a user can fix (``ConfigError``) and a run that ended early for a reason
its message explains (``RunFailure``). Command-line tools print either as one ``error:`` line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class RunFailure(RuntimeError):
    """A run ended early for a reason its message explains (diverged, interrupted): one line, ``exit_code``."""

    exit_code = 1


class CheckpointError(ConfigError):
    """A checkpoint cannot be used: unreadable, truncated, not a tiny_decoder checkpoint, or not the model the
    config describes. The message names the file and the fix."""
