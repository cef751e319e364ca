"""What a run shows on the console: Lightning's start-up chatter that tells a user nothing they chose (which
accelerators exist, a product tip, "100% of the batches will be used", a seed line) is kept out of the console
but still written to ``train.log``; known-harmless library deprecation warnings are silenced once. Everything
else — the config, data and model summaries, where outputs go, warnings that matter — stays."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping

from rich import box
from rich.console import Console
from rich.table import Table

# Lightning INFO lines the console drops (train.log keeps them)
CHATTER = re.compile(
    r"GPU available: |TPU available: |HPU available: |💡 Tip: |litlogger|` was configured so 100% of the batches"
    r"|Loading `train_dataloader` to estimate number of stepping batches|Trainer already configured with model "
    r"summary callbacks|^Seed set to |^setup plugin |Running in `fast_dev_run` mode"
)
# library deprecation warnings that the user cannot act on (raised inside Lightning / torch, not our code)
HARMLESS_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # lightning's _pytree against torch 2.13
    r".*TypedStorage is deprecated",  # inductor's autotuning
    r"Precision .* is not supported by the model summary",  # the summary estimates fp32 sizes: said in the table
)


class ConsoleChatter(logging.Filter):
    """A logging filter for the console handler: drops the lines :data:`CHATTER` matches."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not CHATTER.search(record.getMessage())


LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def quiet_console() -> None:
    """Silence :data:`HARMLESS_WARNINGS`, and send Lightning's log records through the root logger (the run's
    console handler, with its :class:`ConsoleChatter` filter, and ``train.log``) instead of Lightning's own
    console handler. Call it after Hydra configured logging."""
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def print_metrics(metrics: Mapping[str, float], title: str, skip: str = "_family/") -> None:
    """A compact two-column table of ``metrics`` (those whose name holds ``skip`` are left to the logs)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        if skip not in name:
            table.add_row(name, f"{value:.4g}")
    Console().print(table)
