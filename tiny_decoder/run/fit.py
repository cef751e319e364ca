"""Fitting one run and recording its outcome: ``fit_and_test`` (fit, restore the best checkpoint, test, write
``results.json``; with ``trainer.max_steps=0`` and ``init_from``: validate the loaded weights instead of fitting)
and ``train(cfg)``, the plain function the ``train`` tool and the sweepers call: it returns the configured metric,
writes ``error.txt`` for a failure (a multirun goes on with NaN for that job) and always closes the W&B run."""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from tiny_decoder.core.errors import ConfigError, one_line, user_error
from tiny_decoder.run.build import build_run
from tiny_decoder.run.config_checks import resolved_dict
from tiny_decoder.run.console import print_metrics
from tiny_decoder.run.resume import current_overrides
from tiny_decoder.run.run_dir import RunDir
from tiny_decoder.training.callbacks import interrupted_error

if TYPE_CHECKING:
    from tiny_decoder.tasks.base import DecoderTask

log = logging.getLogger(__name__)
NOT_VALIDATION = ("train/", "lr-", "lr/")  # logged while fitting, but not validation metrics


@dataclass
class RunResult:
    """What a finished run leaves behind (also written to ``results.json``)."""

    trainer: L.Trainer
    task: DecoderTask
    results: dict[str, Any]
    metric: float | None


def fit_and_test(cfg: DictConfig) -> RunResult:
    """Fit, restore the best checkpoint, test. The task ends holding the best weights."""
    started = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    eval_only = evaluation_only(cfg)  # checked before anything is built
    run = build_run(cfg)
    log.info("%s", run_banner(cfg, run))
    datamodule, task, trainer = run.datamodule, run.task, run.trainer
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved_dict(cfg))
    if eval_only:
        trainer.validate(task, datamodule=datamodule, verbose=False)
    else:
        _fit(trainer, task, datamodule, run.ckpt_path)
        if run.ckpt_path and not validation_metrics(trainer.callback_metrics) and trainer.limit_val_batches:
            # resumed from a checkpoint of its last step (killed before results.json): score those weights
            trainer.validate(task, datamodule=datamodule, verbose=False)
    fit_metrics = _scalars(trainer.callback_metrics)
    rates = throughput(trainer)  # before the test: its loop starts Lightning's logged metrics afresh
    # the first checkpoint callback (the config's ModelCheckpoint; no other kind is configured)
    checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
    best_path = checkpoint.best_model_path if checkpoint else ""
    best_score = checkpoint.best_model_score if checkpoint and best_path else None
    test_metrics: dict[str, float] = {}
    if cfg.test:
        # the best checkpoint's weights go into the task (EarlyStopping alone would leave the last ones)
        best = best_path or None
        tested = trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
        test_metrics = _scalars(tested[0])
        if trainer.is_global_zero:
            print_metrics(test_metrics, "test, best checkpoint")
    results: dict[str, Any] = {
        "val": validation_metrics(fit_metrics),
        # loss, learning rates, throughput (logged straight to the loggers by Lightning's ThroughputMonitor)
        "train": {k: v for k, v in {**fit_metrics, **rates}.items() if k.startswith(NOT_VALIDATION)},
        "test": test_metrics,
        "best_checkpoint": best_path,
        "best_score": float(best_score) if best_score else None,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "parameters": task.model.num_parameters(),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "torch_threads": torch.get_num_threads(),
        "resumed_from": run.ckpt_path,
    }
    _write_results(cfg, trainer, results)
    metric = fit_metrics.get(cfg.optimized_metric)
    if checkpoint and checkpoint.monitor == cfg.optimized_metric and results["best_score"] is not None:
        metric = results["best_score"]
    return RunResult(trainer, task, results, metric)


def evaluation_only(cfg: DictConfig) -> bool:
    """``trainer.max_steps=0`` with ``init_from``: validate the loaded weights (after the configured post-training
    changes, e.g. ``pruning=magnitude`` or an early-exit threshold) instead of training; a study's post-training
    arms run this way. Without ``init_from`` there would be nothing to evaluate but random weights."""
    if OmegaConf.select(cfg, "trainer.max_steps", default=None) != 0:
        return False
    if not cfg.get("init_from"):
        raise ConfigError(
            "trainer.max_steps=0 evaluates trained weights without training: give them with init_from=PATH.ckpt "
            "(or train: trainer.max_steps > 0)"
        )
    return True


def run_banner(cfg: DictConfig, run: Any) -> str:
    """Where this run writes, what it trains on and what it resumes from, in a few lines for the console."""
    overrides = " ".join(current_overrides() or []) or "(defaults)"
    data = type(run.datamodule).__name__
    lines = [
        f"run: {overrides}",
        f"task: {type(run.task).__name__}, {run.task.model.num_parameters():,} parameters; data: {data}, "
        f"batch {OmegaConf.select(cfg, 'data.batch_size', default='?')}",
        f"outputs: {cfg.paths.output_dir} (checkpoints/, csv/metrics.csv, train.log, results.json)",
    ]
    if cfg.get("init_from"):
        lines.append(f"weights from {cfg.init_from}" + (" (evaluation only)" if evaluation_only(cfg) else ""))
    if run.ckpt_path:
        lines.append(f"resuming from {run.ckpt_path}")
    return "\n".join(lines)


def _fit(trainer: L.Trainer, task: L.LightningModule, datamodule: Any, ckpt_path: str | None) -> None:
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException as stop:  # SIGTERM / Ctrl+C: last.ckpt saved by SignalCheckpoint
        raise interrupted_error(trainer) from stop


def validation_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in _scalars(metrics).items() if not k.startswith(NOT_VALIDATION)}


def throughput(trainer: L.Trainer) -> dict[str, float]:
    """The last rates of Lightning's ThroughputMonitor (``train/*_per_sec`` and ``train/device/mfu``; none when it
    is not configured)."""
    return {k: v for k, v in _scalars(trainer.logged_metrics).items() if k.endswith(("_per_sec", "/mfu"))}


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)) and _is_scalar(v)}


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) or value.numel() == 1


def _write_results(cfg: DictConfig, trainer: L.Trainer, results: dict[str, Any]) -> None:
    if trainer.is_global_zero:
        log.info("results written to %s", RunDir(Path(cfg.paths.output_dir)).write_results(results))


def train(cfg: DictConfig) -> float | None:
    """Run one experiment; return ``cfg.optimized_metric`` (for multirun sweeps).

    A failure is written to ``<output_dir>/error.txt``; in a Hydra multirun it is logged and NaN is returned
    (the sweep goes on), otherwise it is raised. The W&B run, if any, is always finished.
    """
    run_dir = RunDir(_output_dir(cfg))
    run_dir.clear_error(process_rank())
    failed = True
    try:
        metric = fit_and_test(cfg).metric
        failed = False
        return metric
    except Exception as error:
        path = record_failure(run_dir, error)
        if not in_multirun():
            raise
        log.error("job failed: %s (details in %s)", one_line(user_error(error) or error), path)
        return math.nan
    finally:
        finish_wandb(failed)


def process_rank() -> int:
    """This process's global rank as Lightning set it at import (``rank_zero_only.rank``: an attribute Lightning
    adds to that function, unknown to its type)."""
    return getattr(rank_zero_only, "rank", 0)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _output_dir(cfg: DictConfig) -> Path:
    try:
        return Path(str(cfg.paths.output_dir))
    except Exception:  # an unresolvable paths node: record the failure where the command runs
        return Path.cwd()


def record_failure(run_dir: RunDir, error: BaseException) -> Path:
    """``error.txt``: the traceback, then ``<ExceptionType>: <message>`` of the user-level cause as last line."""
    cause = user_error(error) or error
    text = "".join(traceback.format_exception(error)) + f"\n{type(cause).__name__}: {one_line(cause)}\n"
    return run_dir.write_error(text, process_rank())


def finish_wandb(failed: bool) -> None:
    """Close the W&B run of this process, if one was started (a multirun job must not leak into the next)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
