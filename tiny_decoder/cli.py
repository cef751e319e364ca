"""The tools' one entry helper and their shared behaviour: a bad input ends the program with one clear line
and a non-zero exit code.

``hydra_tool(name, function)`` makes the ``python -m tiny_decoder.<name>`` entry of a Hydra tool: it composes
``conf/<name>.yaml`` (found by absolute path, whatever the working directory) with the command line and calls
``function(cfg)`` under :func:`run_cli` inside :func:`run_hydra`. ``run_cli`` alone serves a tool with its own
argument parser (``report``).

Errors a user can fix (a config value, a missing file, a wrong checkpoint) are printed as
``error: <message>`` without a traceback (set ``TINY_DECODER_TRACEBACK=1`` to see it), also when Hydra's
``instantiate`` wrapped them; anything else is a bug and keeps its traceback. Exit codes: 2 for a bad input
(also a config Hydra cannot compose, e.g. ``attention=foo``, via :func:`run_hydra`), 3 for a diverged run
(non-finite loss), 128 + signal for a run stopped by SIGTERM / Ctrl+C after saving its checkpoint.

:class:`FailedJobs` is a Hydra callback: after a multirun it lists the jobs that left an ``error.txt`` and
exits with code 1 when there are any (the other jobs ran to the end).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.errors import (
    CompactHydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.markup import escape

from tiny_decoder.core.errors import one_line, user_error, user_error_types
from tiny_decoder.run.console import quiet_console
from tiny_decoder.run.run_dir import failed_runs

T = TypeVar("T")
R = TypeVar("R")

USER_ERROR_EXIT_CODE = 2


def print_error(message: str) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)


def run_cli(function: Callable[..., T], *args: Any) -> T:
    """Call ``function``; a user error is printed as one line and exits with its code (2 by default)."""
    caught: tuple[type[BaseException], ...] = (*user_error_types(), InstantiationException)
    try:
        return function(*args)
    except caught as error:
        cause = user_error(error)
        if cause is None or os.environ.get("TINY_DECODER_TRACEBACK"):
            raise
        print_error(one_line(cause))
        sys.exit(getattr(cause, "exit_code", USER_ERROR_EXIT_CODE))


def composition_message(error: Exception) -> str:
    """Hydra's composition error on one line; a missing group option lists the available ones."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, MissingConfigException) and error.options:
        return f"{lines[0]}; available options: {', '.join(error.options)}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {' '.join(lines)}"
    cause = error.__cause__
    details = [one_line(cause)] if isinstance(cause, OmegaConfBaseException) else []
    return " ".join([*lines, *details])


def run_hydra(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function so that a config Hydra cannot compose (an unknown option such as
    ``attention=foo``, a key not in the config, a malformed override) is one line and exit code 2 instead of
    Hydra's report. ``HYDRA_FULL_ERROR=1`` or ``TINY_DECODER_TRACEBACK=1`` keep Hydra's own behaviour."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("TINY_DECODER_TRACEBACK"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its multi-line report
    try:
        main()
    except InstantiationException:
        raise
    except (CompactHydraException, ValueError) as error:  # ValueError: Hydra's own command-line checks
        print_error(composition_message(error))
        sys.exit(USER_ERROR_EXIT_CODE)


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: works when imported, not only as __main__


def hydra_tool(name: str, function: Callable[[DictConfig], Any], config_name: str | None = None) -> Callable[[], None]:
    """The entry point of ``python -m tiny_decoder.<name>``: ``function(cfg)`` on ``conf/<config_name or name>.yaml``
    composed with the command line; user errors and configs Hydra cannot compose are one ``error:`` line."""

    def task(cfg: DictConfig) -> Any:
        quiet_console()
        return run_cli(function, cfg)

    task.__module__ = f"tiny_decoder.{name}"  # Hydra names the job (and its <name>.log) after this module
    task.__qualname__ = task.__name__ = name
    main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name or name)(task)

    def entry() -> None:
        run_hydra(main)

    entry.__doc__ = f"``python -m tiny_decoder.{name}``: {function.__name__}(cfg) on conf/{config_name or name}.yaml"
    return entry


def typed_request(cfg: DictConfig, request_type: type[R], **values: Any) -> R:
    """``request_type`` (a dataclass of a task's typed options) from the tool config's fields of the same names;
    ``values`` set the rest. A task never sees the tool's DictConfig."""
    options = {f.name: cfg.get(f.name) for f in dataclasses.fields(request_type) if f.name in cfg}  # type: ignore[arg-type]
    options = {name: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for name, v in options.items()}
    return request_type(**{**{k: v for k, v in options.items() if v is not None}, **values})


class FailedJobs(Callback):
    """Hydra callback (``hydra.callbacks``): after a multirun, name the failed jobs and exit with code 1.

    A failed job leaves ``error.txt`` (exception type, message, traceback) in its directory; the other jobs
    ran to the end, so the multirun directory is complete for ``python -m tiny_decoder.report``.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = failed_runs(sweep_dir)
        if not failed:
            return
        jobs = len(list(sweep_dir.rglob(".hydra")))
        names = ", ".join(str(path.parent.relative_to(sweep_dir)) for path in failed)
        print_error(
            f"{len(failed)} of {jobs} jobs failed (job {names}; see error.txt in each); summary: "
            f"python -m tiny_decoder.report {sweep_dir}"
        )
        sys.exit(1)
