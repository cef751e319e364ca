"""Lightning callbacks of the platform (the rest come straight from Lightning).

``SampleLogger``: at the end of each validation, asks the task for a few continuations of fixed prompts
(stories, number sequences), prints them and logs them as text to TensorBoard and as a table to W&B.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console


class SampleLogger(L.Callback):
    """Logs ``pl_module.sample_texts()`` at each validation end (on rank zero, not while sanity checking)."""

    def __init__(self, every_n_validations: int = 1, print_samples: bool = True):
        self.every_n_validations = every_n_validations
        self.print_samples = print_samples
        self._validations = 0

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not hasattr(pl_module, "sample_texts"):
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        samples = pl_module.sample_texts()
        if self.print_samples:
            console = Console()
            console.print(f"[bold]samples at step {trainer.global_step}[/bold]")
            for prompt, text in samples:
                console.print(f"  [cyan]{prompt}[/cyan] -> {text}", highlight=False)
        for logger in trainer.loggers:
            log_samples(logger, samples, trainer.global_step)


def log_samples(logger: object, samples: list[tuple[str, str]], step: int) -> None:
    """Write (prompt, continuation) pairs to the loggers that can show text."""
    if isinstance(logger, TensorBoardLogger):
        body = "\n\n".join(f"**{prompt}** → {text}" for prompt, text in samples)
        logger.experiment.add_text("samples", body, global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_text(
            key="samples", columns=["step", "prompt", "continuation"], data=[[step, p, t] for p, t in samples]
        )
