"""Training entry point: ``python -m tiny_decoder.train +experiment=NAME [overrides]``.

``train(cfg)`` is a plain function (config -> data module + model -> task -> trainer -> results) that
returns the configured metric, so multirun sweeps can optimise it. Invalid configuration (also an out-of-range
value, a model too small for its data, a checkpoint that does not fit) fails before any training with one line
naming the field; results (metrics, wall time, parameter count) are written to ``results.json`` in the run's
output directory. A failing run leaves ``error.txt`` (exception type, message, traceback) there instead; in a
multirun the other jobs go on (the failed one returns NaN to the sweeper) and the multirun exits with code 1.

Resume: ``resume=PATH.ckpt``, or ``resume=auto``: the newest ``last.ckpt`` under ``paths.resume_dir`` written
by the same command (same overrides, ignoring ``resume``, ``paths.*``, ``logger*`` and the ``trainer.max_*``
budget). The resumed run logs to its own new directory (the original's logs stay as they are) and keeps
writing checkpoints next to the one it resumed from, so best-checkpoint tracking and ``last.ckpt`` carry on.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from tiny_decoder.cli import ERROR_FILE, one_line, run_cli, run_hydra, user_error
from tiny_decoder.core.checks import check, is_betas, is_bool, is_count, is_non_negative, is_positive
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.validation import validate_model_config
from tiny_decoder.training.callbacks import interrupted_error

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------------------


# Lightning's precision values (its legacy spellings 64, 32, 16, "bf16" included)
PRECISIONS = ("64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16")  # fmt: skip


def is_precision(value: Any) -> bool:
    return str(value) in PRECISIONS


# (config key, check, what it must be): checked when the key exists and is not null
RANGE_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("optimizer.lr", is_positive, "a positive number"),
    ("optimizer.weight_decay", is_non_negative, ">= 0"),
    ("optimizer.eps", is_positive, "a positive number"),
    ("optimizer.betas", is_betas, "two numbers in [0, 1)"),
    ("scheduler.warmup_steps", is_count, "an integer >= 0"),
    ("scheduler.min_lr", is_non_negative, ">= 0"),
    ("trainer.gradient_clip_val", is_non_negative, ">= 0 (or null: no clipping)"),
    ("compile", is_bool, "true or false"),
    ("precision", is_precision, f"one of {', '.join(PRECISIONS[:6])} (or null: trainer.precision)"),
    ("trainer.precision", is_precision, f"one of {', '.join(PRECISIONS[:6])}"),
)


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first out-of-range training option (the model checks its own)."""
    for key, predicate, wanted in RANGE_CHECKS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (DictConfig, Mapping)) or value is None:
            continue
        check(key, OmegaConf.to_object(value) if OmegaConf.is_config(value) else value, predicate, wanted)


def build_model_config(cfg: DictConfig, datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The resolved model config with ``vocab_size`` / ``context_length`` taken from the data when null;
    fails when the data does not fit the model (longer sequences than its positions, more token ids)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for field in ("vocab_size", "context_length"):
        if model.get(field) is None:
            model[field] = int(getattr(datamodule, field))
    config = validate_model_config(ModelConfig.from_dict(model))
    check_fits_data(config, datamodule)
    return config.to_dict()


def check_fits_data(config: ModelConfig, datamodule: Any) -> None:
    context = getattr(datamodule, "context_length", None)
    if context is not None and int(context) > config.context_length:
        raise ConfigError(
            f"the data's sequences ({context} tokens) are longer than the model's context / positional table "
            f"(model.context_length={config.context_length}); raise model.context_length (or set it to null) or "
            "shorten the data (data.seq_len / data.context_length)"
        )
    vocab = getattr(datamodule, "vocab_size", None)
    if vocab is not None and int(vocab) > config.vocab_size:
        raise ConfigError(
            f"the data has {vocab} token ids but model.vocab_size={config.vocab_size}; raise model.vocab_size "
            "(or set it to null)"
        )


def instantiate_named(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers); skip nulls."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


# --------------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------------

# overrides that may change between a run and its resumption (a longer budget, other loggers, speed switches)
IGNORED_FOR_RESUME = (
    "resume",
    "paths.",
    "logger",
    "torch_threads",
    "compile",  # compile and compile_options: the same computation, faster
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
)


def command_signature(overrides: Iterable[str]) -> frozenset[str]:
    """The overrides that identify "the same command" for ``resume=auto``."""
    keys = ((override.strip(), override.split("=", 1)[0].lstrip("+~")) for override in overrides)
    return frozenset(text for text, key in keys if not key.startswith(IGNORED_FOR_RESUME))


def current_overrides() -> list[str] | None:
    """This run's command-line overrides (None outside a Hydra run, e.g. a composed config in a test)."""
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def run_overrides(checkpoint: Path) -> list[str] | None:
    """The overrides of the run that wrote ``<run>/checkpoints/<name>.ckpt`` (None when not recorded)."""
    path = checkpoint.parent.parent / ".hydra" / "overrides.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def find_auto_checkpoint(resume_dir: Path, overrides: list[str] | None) -> str | None:
    """The newest ``last.ckpt`` under ``resume_dir`` of the same command (of any run, without overrides)."""
    candidates = sorted(resume_dir.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    wanted = None if overrides is None else command_signature(overrides)
    for candidate in candidates:
        theirs = run_overrides(candidate)
        if wanted is None or (theirs is not None and command_signature(theirs) == wanted):
            log.info("resume=auto: continuing from %s", candidate)
            return str(candidate)
    skipped = f" ({len(candidates)} from other commands)" if candidates else ""
    log.warning("resume=auto: no last.ckpt of this command under %s%s; starting fresh", resume_dir, skipped)
    return None


def _flatten(values: Mapping[str, Any], prefix: str = "model") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        flat.update(_flatten(value, name) if isinstance(value, Mapping) else {name: value})
    return flat


def model_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    theirs, ours = _flatten(stored), _flatten(current)
    missing = "(unset)"
    return [
        f"{key}: {theirs.get(key, missing)} in the checkpoint, {ours.get(key, missing)} here"
        for key in sorted(set(theirs) | set(ours))
        if theirs.get(key, missing) != ours.get(key, missing)
    ]


def check_checkpoint(path: str, model_config: Mapping[str, Any] | None, task_name: str | None) -> None:
    """Fail with one line unless ``path`` is a readable (``weights_only``) checkpoint of the same task and model."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"resume={path}: cannot read this checkpoint ({reason}); it is truncated, corrupt or not a "
            "Lightning checkpoint"
        ) from error
    meta = checkpoint.get("tiny_decoder") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "model" not in meta:
        raise ConfigError(f"resume={path}: not a tiny_decoder training checkpoint (no 'tiny_decoder' metadata)")
    if task_name is not None and meta.get("task") != task_name:
        raise ConfigError(f"resume={path}: a checkpoint of task {meta.get('task')!r}, this run trains {task_name!r}")
    stored = ModelConfig.from_dict(meta["model"]).to_dict()  # options added since then get their defaults
    differences = model_differences(stored, model_config) if model_config is not None else []
    if differences:
        shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
        raise ConfigError(
            f"resume={path}: the checkpoint's model differs from this config: {shown} (resume with the same "
            "model options, or start a fresh run)"
        )


def resolve_resume(
    cfg: DictConfig, model_config: Mapping[str, Any] | None = None, task_name: str | None = None
) -> str | None:
    """``resume``: null, a checkpoint path, or ``auto``; the checkpoint is checked against the model config."""
    if cfg.resume in (None, "", "none"):
        return None
    auto = cfg.resume == "auto"
    path = find_auto_checkpoint(Path(cfg.paths.resume_dir), current_overrides()) if auto else given(str(cfg.resume))
    if path is not None:
        check_checkpoint(path, model_config, task_name)
    return path


def given(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"resume={path}: no such checkpoint file")
    return path


def continue_checkpoints_in(cfg: DictConfig, ckpt_path: str) -> None:
    """Point ``paths.checkpoint_dir`` at the resumed checkpoint's folder (best / last tracking carries on)."""
    with open_dict(cfg):
        cfg.paths.checkpoint_dir = str(Path(ckpt_path).resolve().parent)


# --------------------------------------------------------------------------------------------------------
# Fit, test, results
# --------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a finished run leaves behind (also written to ``results.json``)."""

    trainer: L.Trainer
    task: L.LightningModule
    results: dict[str, Any]
    metric: float | None


@dataclass
class Run:
    """What ``train(cfg)`` builds before fitting (also used by ``benchmarks/training.py``)."""

    datamodule: L.LightningDataModule
    task: L.LightningModule
    trainer: L.Trainer
    ckpt_path: str | None  # the checkpoint to resume from


def build_run(cfg: DictConfig, extra_callbacks: Iterable[L.Callback] = ()) -> Run:
    """Seed, then data module, task (compiled under ``compile=true``), resume checkpoint and trainer; checks the
    configuration before anything is trained. ``cfg`` may be updated (a resumed run's checkpoint folder)."""
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    model_config = build_model_config(cfg, datamodule)
    task = instantiate(
        cfg.task,
        model=model_config,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        _convert_="all",
    )
    if cfg.get("compile"):
        task.compile_steps(**compile_options(cfg))
    ckpt_path = resolve_resume(cfg, model_config, getattr(task, "task_name", None))
    if ckpt_path:
        continue_checkpoints_in(cfg, ckpt_path)
    callbacks = [*instantiate_named(cfg.get("callbacks")), *extra_callbacks]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_named(cfg.get("logger")), **trainer_overrides(cfg)
    )
    return Run(datamodule, task, trainer, ckpt_path)


def compile_options(cfg: DictConfig) -> dict[str, Any]:
    """``torch.compile`` keyword arguments from ``compile_options`` (null entries: torch's defaults)."""
    options = OmegaConf.to_container(cfg.get("compile_options") or {}, resolve=True)
    return {key: value for key, value in options.items() if value is not None}


def trainer_overrides(cfg: DictConfig) -> dict[str, Any]:
    """Top-level shortcuts for Trainer arguments: ``precision=bf16-mixed`` sets ``trainer.precision``."""
    return {} if cfg.get("precision") is None else {"precision": cfg.precision}


def fit_and_test(cfg: DictConfig) -> RunResult:
    """Fit, restore the best checkpoint, test. The task ends holding the best weights."""
    started = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    run = build_run(cfg)
    datamodule, task, trainer = run.datamodule, run.task, run.trainer
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    _fit(trainer, task, datamodule, run.ckpt_path)
    fit_metrics = _scalars(trainer.callback_metrics)
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint else ""
    test_metrics: dict[str, float] = {}
    if cfg.test:
        # the best checkpoint's weights go into the task (EarlyStopping alone would leave the last ones)
        best = best_path or None
        test_metrics = _scalars(trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=True)[0])
    results = {
        "val": fit_metrics,
        "test": test_metrics,
        "best_checkpoint": best_path,
        "best_score": float(checkpoint.best_model_score) if best_path and checkpoint.best_model_score else None,
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


def _fit(trainer: L.Trainer, task: L.LightningModule, datamodule: Any, ckpt_path: str | None) -> None:
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException as stop:  # SIGTERM / Ctrl+C: last.ckpt saved by SignalCheckpoint
        raise interrupted_error(trainer) from stop


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)) and _is_scalar(v)}


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) or value.numel() == 1


def _write_results(cfg: DictConfig, trainer: L.Trainer, results: dict[str, Any]) -> None:
    if trainer.is_global_zero:
        path = Path(cfg.paths.output_dir) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        log.info("results written to %s", path)


# --------------------------------------------------------------------------------------------------------
# train(): failures recorded, W&B closed
# --------------------------------------------------------------------------------------------------------


def train(cfg: DictConfig) -> float | None:
    """Run one experiment; return ``cfg.optimized_metric`` (for multirun sweeps).

    A failure is written to ``<output_dir>/error.txt``; in a Hydra multirun it is logged and NaN is returned
    (the sweep goes on), otherwise it is raised. The W&B run, if any, is always finished.
    """
    output_dir = _output_dir(cfg)
    _error_path(output_dir).unlink(missing_ok=True)
    failed = True
    try:
        metric = fit_and_test(cfg).metric
        failed = False
        return metric
    except Exception as error:
        record_failure(output_dir, error)
        if not in_multirun():
            raise
        log.error("job failed: %s (details in %s)", one_line(user_error(error) or error), _error_path(output_dir))
        return math.nan
    finally:
        finish_wandb(failed)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _output_dir(cfg: DictConfig) -> Path:
    try:
        return Path(str(cfg.paths.output_dir))
    except Exception:  # an unresolvable paths node: record the failure where the command runs
        return Path.cwd()


def _error_path(output_dir: Path) -> Path:
    rank = rank_zero_only.rank
    return output_dir / (ERROR_FILE if rank == 0 else f"error_rank{rank}.txt")


def record_failure(output_dir: Path, error: BaseException) -> Path:
    """``error.txt``: the traceback, then ``<ExceptionType>: <message>`` of the user-level cause as last line."""
    cause = user_error(error) or error
    text = "".join(traceback.format_exception(error)) + f"\n{type(cause).__name__}: {one_line(cause)}\n"
    path = _error_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def finish_wandb(failed: bool) -> None:
    """Close the W&B run of this process, if one was started (a multirun job must not leak into the next)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: works when imported, not only as __main__


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_cli(train, cfg)


def cli() -> None:
    """``python -m tiny_decoder.train``: a config Hydra cannot compose is one line too (exit code 2)."""
    run_hydra(main)


if __name__ == "__main__":
    cli()
