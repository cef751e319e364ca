"""Lightning callbacks of the platform (the rest come straight from Lightning).

- ``SampleLogger``: at the end of each validation, asks the task for a few continuations of fixed prompts
  (stories, number sequences), prints them and logs them as text to TensorBoard and as a table to W&B.
- ``AttentionMapLogger``: at the end of each validation, draws the attention weights of every layer and head
  on the first validation sequence and logs the picture to W&B and TensorBoard (and keeps the PNG).
- ``CompactModelSummary`` / ``StepProgressBar``: Lightning's Rich summary and progress bar, readable at 80
  columns (the model's modules only, compact shapes) and without ``Epoch 0/-2`` for runs bounded by steps.
- ``batch_size`` / ``batch_tokens``: what Lightning's ``ThroughputMonitor`` counts (``callbacks.throughput``:
  ``train/samples_per_sec`` and ``train/items_per_sec``, the items being tokens; ``results.json`` keeps the last).
- ``ValidateAtEnd``: a run that reaches ``trainer.max_steps`` between validations validates on its last step.
- ``FiniteLossGuard``: stops the run at the first non-finite training loss, with a message naming the step
  and the last good checkpoint (raised before the checkpoint callbacks run, so they never save the bad state).
- ``SignalCheckpoint``: on SIGTERM (a cluster's preemption, ``docker stop``) or Ctrl+C, finishes the current
  batch, saves ``last.ckpt`` and stops; a second Ctrl+C aborts at once.
- ``ExactResume``: makes a resumed run repeat the uninterrupted one exactly: the training order depends only
  on ``(seed, epoch)``, a resumed loader skips the batches its checkpoint had already consumed (Lightning saves
  the loader's ``state_dict``), and torch's RNG is re-seeded from ``(seed, rank, epoch, batch)`` before every
  training batch, so dropout does not depend on what ran before (validation, a restart).
"""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich import box
from rich.console import Console
from rich.table import Table
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from tiny_decoder.core.checks import check_int
from tiny_decoder.core.errors import RunFailure
from tiny_decoder.core.seeds import mix_seed

if TYPE_CHECKING:
    from lightning.pytorch.loops.progress import _ProcessedTracker

    from tiny_decoder.model import DecoderTransformer

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Samples and attention maps
# --------------------------------------------------------------------------------------------------------


class EveryNValidations:
    """Counts the validations a callback sees and says which ones are its turn: the 1st, N+1th, 2N+1th..."""

    def __init__(self, every_n_validations: int, field: str = "every_n_validations"):
        self.every_n_validations = check_int(field, every_n_validations, 1)
        self.count = 0

    def turn(self) -> bool:
        """Count one validation; True when it is one to act on."""
        self.count += 1
        return (self.count - 1) % self.every_n_validations == 0


class SampleLogger(L.Callback):
    """Logs ``pl_module.sample_texts()`` at each validation end (on rank zero, not while sanity checking)."""

    def __init__(self, every_n_validations: int = 1, print_samples: bool = True):
        self.schedule = EveryNValidations(every_n_validations, "callbacks.samples.every_n_validations")
        self.print_samples = print_samples

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sample_texts = getattr(pl_module, "sample_texts", None)
        if trainer.sanity_checking or sample_texts is None or not self.schedule.turn():
            return
        samples = sample_texts()
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
        rows: list[list[Any]] = [[step, p, t] for p, t in samples]  # W&B cells: any values (typed str)
        logger.log_text(key="samples", columns=["step", "prompt", "continuation"], data=rows)


IMAGE_LOGGERS = (TensorBoardLogger, WandbLogger)


class AttentionMapLogger(L.Callback):
    """Every ``every_n_validations`` validations, a ``layers x heads`` grid of attention heatmaps of the model
    on the first ``max_tokens`` tokens of the first validation sequence, saved as
    ``<dirpath>/step<N>.png`` and logged as the image ``attention`` to W&B and TensorBoard. Does nothing when
    no such logger is attached; warns once and stops for attentions without per-token weights (linformer).

    ``ids`` (``(1, tokens)``, set by ``on_validation_batch_start``; ``None`` before) is the sequence
    :meth:`draw` shows; ``disabled`` says whether drawing has stopped."""

    def __init__(self, dirpath: str | Path, every_n_validations: int = 1, max_tokens: int = 32):
        self.dirpath = Path(dirpath)
        self.schedule = EveryNValidations(every_n_validations, "callbacks.attention_maps.every_n_validations")
        self.max_tokens = max_tokens
        self.ids: torch.Tensor | None = None
        self._disabled = False

    @property
    def disabled(self) -> bool:
        """True once drawing failed (an attention without per-token weights): no more maps this run."""
        return self._disabled

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, Mapping) and "input" in batch:
            self.ids = batch["input"][:1, : self.max_tokens].detach().cpu()

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, IMAGE_LOGGERS)]
        if trainer.sanity_checking or self._disabled or self.ids is None or not loggers or not self.schedule.turn():
            return
        path = self.draw(pl_module, trainer.global_step)
        for logger in loggers:
            log_image(logger, path, trainer.global_step)

    def draw(self, pl_module: L.LightningModule, step: int) -> Path | None:
        from tiny_decoder.analysis.attention_maps import attention_weights, save_attention_png  # matplotlib

        ids = self.ids
        assert ids is not None, "draw() needs the first validation sequence (on_validation_batch_start sets ids)"
        try:
            # the live model keeps its mode and device
            model = cast("DecoderTransformer", copy.deepcopy(pl_module.model)).cpu().eval()
            weights = attention_weights(model, ids)
        except (ValueError, RuntimeError) as error:  # linformer has no per-token weights; a sharded model
            rank_zero_warn(f"attention maps disabled: {error}")
            self._disabled = True
            return None
        labels = token_labels(pl_module, ids[0].tolist())
        title = f"attention at step {step} ({model.config.attention['name']})"
        return save_attention_png(weights, labels, self.dirpath / f"step{step:07d}.png", title)


def token_labels(pl_module: L.LightningModule, ids: list[int]) -> list[str]:
    """Token texts when the task has a tokenizer (language model), else the ids (numbers)."""
    from tiny_decoder.analysis.attention_maps import token_label, tokenizer_of

    tokenizer = tokenizer_of(pl_module)
    return [token_label(tokenizer, i) for i in ids] if tokenizer is not None else [str(i) for i in ids]


def log_image(logger: object, path: Path | None, step: int) -> None:
    """Log a PNG file as the image ``attention`` to W&B or TensorBoard."""
    if path is None:
        return
    if isinstance(logger, WandbLogger):
        logger.log_image(key="attention", images=[str(path)], step=step)
    elif isinstance(logger, TensorBoardLogger):
        from matplotlib.image import imread

        logger.experiment.add_image("attention", imread(path)[..., :3], global_step=step, dataformats="HWC")


# --------------------------------------------------------------------------------------------------------
# Failure handling: non-finite loss, signals
# --------------------------------------------------------------------------------------------------------


class CompactModelSummary(RichModelSummary):
    """Lightning's Rich model summary, readable at 80 columns: the model's modules only (not the metric
    collections), name, type, parameters and compact in/out shapes (``2x8x96``), then one line of totals."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        table = Table(box=box.SIMPLE_HEAD, header_style="bold magenta", pad_edge=False)
        shown = [name for name in ("Name", "Type", "Params", "In sizes", "Out sizes") if name in columns]
        for name in shown:
            table.add_column(name, justify="left" if name in ("Name", "Type") else "right", no_wrap=name == "Name")
        for row in zip(*(columns[name] for name in shown), strict=True):
            if "_metrics" not in row[0]:
                cells = zip(shown, row, strict=True)
                table.add_row(*(compact_shape(cell) if "sizes" in name else cell for name, cell in cells))
        console = Console()
        console.print(table)
        console.print(
            f"[bold]parameters[/]: {get_human_readable_count(trainable_parameters)} trainable, "
            f"{get_human_readable_count(total_parameters - trainable_parameters)} frozen, "
            f"{model_size:.2f} MB in fp32; {get_human_readable_count(total_flops)} FLOPs per forward of the "
            "example batch",
            highlight=False,
        )


def compact_shape(text: str) -> str:
    """``[2, 8, 96]`` -> ``2x8x96``; ``[[2, 8, 96], '?', '?']`` -> ``2x8x96 ?`` (the shapes of several inputs)."""
    shapes = re.findall(r"\[([\d, ]+)\]|'\?'|\?", text)
    parts = ["x".join(part.replace(" ", "").split(",")) if part else "?" for part in shapes]
    return " ".join(parts) or text


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar; a run bounded by steps (``max_epochs=-1``) shows ``Epoch N`` without
    Lightning's ``/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        return (
            description.replace(f"/{max_epochs - 1}", "") if max_epochs is not None and max_epochs < 0 else description
        )


def batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    """Sequences in a batch (``ThroughputMonitor``'s ``batch_size_fn``)."""
    return int(batch["input"].shape[0])


def batch_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Input tokens in a batch (``ThroughputMonitor``'s ``length_fn``: its items per second are tokens/s)."""
    return int(batch["input"].numel())


class ValidateAtEnd(L.Callback):
    """A run stopped by ``trainer.max_steps`` between two validations validates once more on its last step, so
    its final weights are scored, checkpointed (best / last) and early stopping sees ``val/loss``: a quick
    ``trainer.max_steps=20`` try of a long recipe ends like a finished run instead of with no checkpoint. It asks
    Lightning to stop at that step (``trainer.should_stop``), which is when Lightning runs a validation early."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        max_steps = trainer.max_steps
        if max_steps is not None and max_steps > 0 and trainer.global_step >= max_steps and trainer.limit_val_batches:
            trainer.should_stop = True


class NonFiniteLossError(RunFailure):
    """The training loss became NaN or infinite; the run stops (exit code 3)."""

    exit_code = 3


class TrainingInterrupted(RunFailure):
    """The run stopped on SIGTERM / SIGINT after saving ``last.ckpt`` (exit code 128 + the signal's number)."""

    def __init__(self, message: str, exit_code: int = 128 + signal.SIGTERM):
        super().__init__(message)
        self.exit_code = exit_code


def newest_checkpoint(trainer: L.Trainer) -> str | None:
    """The most recently written checkpoint of the trainer's checkpoint callbacks (None if none exists)."""
    paths = {
        getattr(cb, name, "") for cb in trainer.checkpoint_callbacks for name in ("last_model_path", "best_model_path")
    }
    existing = [Path(p) for p in paths if p and Path(p).is_file()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None


class FiniteLossGuard(L.Callback):
    """Raises :class:`NonFiniteLossError` at the first training batch whose loss is NaN or infinite, naming the
    step and the last good checkpoint. Lightning runs checkpoint callbacks after the others, so the bad state
    is never saved. ``check_every_n_steps`` > 1 saves the GPU sync of the check on the other steps."""

    def __init__(self, check_every_n_steps: int = 1):
        self.check_every_n_steps = check_every_n_steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or trainer.global_step % self.check_every_n_steps:
            return
        if bool(torch.isfinite(loss.detach()).all()):
            return
        last_good = newest_checkpoint(trainer) or "none saved yet"
        raise NonFiniteLossError(
            f"non-finite training loss ({loss.detach().float().mean().item()}) at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {batch_idx}); stopped. Last good checkpoint: {last_good} "
            "(try a lower optimizer.lr or a longer scheduler.warmup_steps)"
        )


class SignalCheckpoint(L.Callback):
    """SIGTERM or Ctrl+C during training: finish the batch, save ``<dirpath>/<filename>.ckpt``, stop.

    Lightning turns SIGTERM into a clean stop at the end of the current batch (on every DDP rank); this
    callback sends Ctrl+C the same way (a second Ctrl+C aborts at once) and saves the checkpoint when the
    stop happens, so ``resume=auto`` continues from that exact batch.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last"):
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.received: int | None = None
        self.saved_path: str | None = None
        self._lightning_handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.saved_path = None, None
        handler = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(handler):
            return
        self._lightning_handler = handler
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: stop now
        self.received = signum
        if signum == signal.SIGINT:
            log.warning("Ctrl+C: stopping after this batch and saving a checkpoint (press again to abort at once)")
        self._lightning_handler(signum, frame)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.path)
        self.saved_path = str(self.path)
        log.warning("stopped at step %d; checkpoint saved to %s", trainer.global_step, self.path)

    def interrupted(self, trainer: L.Trainer) -> TrainingInterrupted:
        """The error that ends the run after the stop."""
        signum = self.received or signal.SIGTERM
        saved = f"saved {self.saved_path}" if self.saved_path else "no checkpoint saved"
        return TrainingInterrupted(
            f"interrupted by {signal.Signals(signum).name} at step {trainer.global_step}; {saved}; "
            "continue with resume=auto (same command)",
            exit_code=128 + signum,
        )


def interrupted_error(trainer: L.Trainer) -> TrainingInterrupted:
    """What a run stopped by a signal raises (from its :class:`SignalCheckpoint`, if it has one)."""
    callbacks = getattr(trainer, "callbacks", [])  # set by Lightning, not declared on Trainer
    saver = next((cb for cb in callbacks if isinstance(cb, SignalCheckpoint)), None)
    if saver is not None:
        return saver.interrupted(trainer)
    return TrainingInterrupted(f"interrupted at step {trainer.global_step}; continue with resume=auto")


# --------------------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------------------


class SkippingBatchSampler(BatchSampler):
    """A BatchSampler whose next iteration first draws and drops ``skip`` batches of indices: a resumed epoch
    continues the exact order of the uninterrupted one without loading or collating the batches already trained
    on (the sampler's indices are cheap; the samples behind them are not)."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool):
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = super().__iter__()
        skip, self.skip = self.skip, 0
        collections.deque(itertools.islice(batches, skip), maxlen=0)  # consumed, nothing kept
        yield from batches


class ResumableLoader(DataLoader):
    """A DataLoader whose shuffle order depends only on ``(seed, epoch)`` and that can resume mid-epoch.

    ``state_dict()`` records the epoch and the batches served so far; after ``load_state_dict`` the next
    iteration of that epoch skips them in its :class:`SkippingBatchSampler` (indices drawn, samples never
    loaded: resuming costs the same at any point of the epoch). ``epoch_fn`` tells the current epoch (the
    trainer's), so a loader reused across epochs reshuffles the same way an uninterrupted run does.
    """

    batch_sampler: SkippingBatchSampler

    def __init__(
        self,
        dataset: Any,
        *,
        shuffle: bool = False,
        batch_size: int | None = 1,
        drop_last: bool = False,
        seed: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ):
        # Lightning re-creates the loader under DDP with its DistributedSampler: as a new batch sampler of this
        # class over it (then shuffle / batch_size / drop_last come as their defaults), or as the sampler alone
        if batch_sampler is None:
            if sampler is None:
                generator = torch.Generator() if shuffle else None
                sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
            batch_sampler = SkippingBatchSampler(sampler, batch_size or 1, drop_last)
        if not isinstance(batch_sampler, SkippingBatchSampler):
            batch_sampler = SkippingBatchSampler(
                batch_sampler.sampler, batch_sampler.batch_size, batch_sampler.drop_last
            )
        super().__init__(dataset, batch_sampler=batch_sampler, generator=generator, **kwargs)
        self.seed = seed
        self.epoch_fn = epoch_fn
        self.epoch = 0
        self.batches = 0
        self._iterations = 0
        self._pending: tuple[int, int] | None = None

    # torch types DataLoader.__iter__ as returning its _BaseDataLoaderIter; this one is a generator over its batches
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.epoch = self.epoch_fn() if self.epoch_fn is not None else self._iterations
        self._iterations += 1
        if self.generator is not None:
            self.generator.manual_seed(mix_seed(self.seed, self.epoch))
        self.batches = self.batch_sampler.skip = self._batches_to_skip()
        return self._counted(super().__iter__())

    def _batches_to_skip(self) -> int:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != self.epoch or not 0 < pending[1] < len(self):
            return 0
        return pending[1]

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._pending = (int(state["epoch"]), int(state["batches"]))


def resumable_loader(loader: Any, seed: int, epoch_fn: Callable[[], int]) -> Any:
    """``loader`` rebuilt as a :class:`ResumableLoader` (same dataset and options); other iterables unchanged."""
    sampler = getattr(loader, "sampler", None)
    plain = (
        type(loader) is DataLoader
        and type(loader.batch_sampler) is BatchSampler
        and (type(sampler) is SequentialSampler or (type(sampler) is RandomSampler and not sampler.replacement))
    )
    if not plain:
        rank_zero_warn("ExactResume: the training loader is not a plain DataLoader; a resumed epoch starts over")
        return loader
    options = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers:
        options["prefetch_factor"] = loader.prefetch_factor
    return ResumableLoader(
        loader.dataset,
        shuffle=isinstance(sampler, RandomSampler),
        batch_size=loader.batch_size,
        drop_last=loader.drop_last,
        seed=seed,
        epoch_fn=epoch_fn,
        **options,
    )


class ExactResume(L.Callback):
    """Training order and randomness as pure functions of ``(seed, epoch, batch)``, so that a run resumed from
    any checkpoint (even mid-epoch) ends exactly like the uninterrupted run with the same seed.

    Wraps the data module's ``train_dataloader`` (during fit) into a :class:`ResumableLoader`, and re-seeds
    torch's RNG before every training batch from ``(seed, rank, epoch, batch index)``.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)  # set by Lightning, not declared on Trainer
        if stage != "fit" or datamodule is None or "train_dataloader" in vars(datamodule):
            return
        original = datamodule.train_dataloader

        def train_dataloader() -> Any:
            return resumable_loader(original(), self.seed, lambda: processed_epochs(trainer))

        # Lightning's is_overridden() looks through __wrapped__ (update_wrapper copying nothing sets only that)
        functools.update_wrapper(train_dataloader, original, assigned=(), updated=())
        datamodule.train_dataloader = train_dataloader

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and "train_dataloader" in vars(datamodule):
            del datamodule.train_dataloader

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seed_generators(mix_seed(self.seed, trainer.global_rank, trainer.current_epoch, batch_idx), pl_module.device)


WANDB_RUN_ID_KEY = "wandb_run_id"


class WandbRunId(L.Callback):
    """Keeps the W&B run's id in every checkpoint (``checkpoint["wandb_run_id"]``), so a run resumed from it logs
    into the same W&B run (``run/resume.py``'s ``continue_wandb_run``: ``id`` + ``resume="allow"``)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                checkpoint[WANDB_RUN_ID_KEY] = logger.version


def processed_epochs(trainer: L.Trainer) -> int:
    """The fit loop's processed epochs (its epoch tracker is a ``_ProcessedTracker``, typed as its base class)."""
    return cast("_ProcessedTracker", trainer.fit_loop.epoch_progress.current).processed


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and, on an accelerator, that device's: what a training step draws from.
    (``torch.manual_seed`` also probes and seeds every other backend, ~1.3 ms a call: most of a tiny model's
    step, benchmarks/training.py.)"""
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        torch.manual_seed(seed)
