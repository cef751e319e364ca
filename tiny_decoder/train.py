"""Training entry point: ``python -m tiny_decoder.train +experiment=NAME [overrides]``.

``train(cfg)`` is a plain function (config -> data module + model -> task -> trainer -> results) that
returns the configured metric, so multirun sweeps can optimise it. Invalid configuration fails before any
training with one line naming the field; results (metrics, wall time, parameter count) are written to
``results.json`` in the run's output directory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tiny_decoder.cli import run_cli
from tiny_decoder.model.config import ModelConfig

log = logging.getLogger(__name__)


def build_model_config(cfg: DictConfig, datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The resolved model config with ``vocab_size`` / ``context_length`` taken from the data when null."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for field in ("vocab_size", "context_length"):
        if model.get(field) is None:
            model[field] = int(getattr(datamodule, field))
    return ModelConfig.from_dict(model).to_dict()


def instantiate_named(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers); skip nulls."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def resolve_resume(cfg: DictConfig) -> str | None:
    """``resume``: null, a checkpoint path, or ``auto`` (the newest ``last.ckpt`` under ``paths.resume_dir``)."""
    if cfg.resume in (None, "", "none"):
        return None
    if cfg.resume != "auto":
        if not Path(cfg.resume).is_file():
            raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint file")
        return str(cfg.resume)
    candidates = sorted(Path(cfg.paths.resume_dir).glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        log.warning("resume=auto: no last.ckpt under %s; starting fresh", cfg.paths.resume_dir)
        return None
    log.info("resume=auto: continuing from %s", candidates[-1])
    return str(candidates[-1])


@dataclass
class RunResult:
    """What a finished run leaves behind (also written to ``results.json``)."""

    trainer: L.Trainer
    task: L.LightningModule
    results: dict[str, Any]
    metric: float | None


def fit_and_test(cfg: DictConfig) -> RunResult:
    """Fit, restore the best checkpoint, test. The task ends holding the best weights."""
    started = time.perf_counter()
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
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
    ckpt_path = resolve_resume(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_named(cfg.get("callbacks")), logger=instantiate_named(cfg.get("logger"))
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_metrics = _scalars(trainer.callback_metrics)
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint else ""
    test_metrics: dict[str, float] = {}
    if cfg.test:
        # "best" loads the best weights into the task (EarlyStopping alone would leave the last ones)
        test_metrics = _scalars(trainer.test(task, datamodule=datamodule, ckpt_path="best" if best_path else None)[0])
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
    }
    _write_results(cfg, trainer, results)
    metric = fit_metrics.get(cfg.optimized_metric)
    if checkpoint and checkpoint.monitor == cfg.optimized_metric and results["best_score"] is not None:
        metric = results["best_score"]
    return RunResult(trainer, task, results, metric)


def train(cfg: DictConfig) -> float | None:
    """Run one experiment; return ``cfg.optimized_metric`` (for multirun sweeps)."""
    return fit_and_test(cfg).metric


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_cli(train, cfg)


if __name__ == "__main__":
    main()
