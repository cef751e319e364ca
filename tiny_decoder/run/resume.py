"""Resuming a run: ``resume=PATH.ckpt`` or ``resume=auto`` (the newest ``last.ckpt`` under ``paths.resume_dir``
written by the same command: the same overrides apart from ``resume``, ``paths.*``, loggers, speed switches and
the ``trainer.max_*`` budget). The checkpoint is checked against the run's task and model before anything
trains; the resumed run keeps writing checkpoints next to the one it resumed from, and logs into the W&B run its
checkpoint names (``continue_wandb_run``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from tiny_decoder.run.run_dir import RunDir
from tiny_decoder.tasks.checkpoint import check_checkpoint, read_checkpoint
from tiny_decoder.training.callbacks import WANDB_RUN_ID_KEY

log = logging.getLogger(__name__)

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


def find_auto_checkpoint(resume_dir: Path, overrides: list[str] | None) -> str | None:
    """The newest ``last.ckpt`` under ``resume_dir`` of the same command (of any run, without overrides)."""
    candidates = sorted(resume_dir.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    wanted = None if overrides is None else command_signature(overrides)
    for candidate in candidates:
        theirs = RunDir.of_checkpoint(candidate).read_overrides()
        if wanted is None or (theirs is not None and command_signature(theirs) == wanted):
            log.info("resume=auto: continuing from %s", candidate)
            return str(candidate)
    skipped = f" ({len(candidates)} from other commands)" if candidates else ""
    log.warning("resume=auto: no last.ckpt of this command under %s%s; starting fresh", resume_dir, skipped)
    return None


def resolve_resume(
    cfg: DictConfig, model_config: Mapping[str, Any] | None = None, task_name: str | None = None
) -> str | None:
    """``resume``: null, a checkpoint path, or ``auto``; the checkpoint is checked against the model config."""
    if cfg.resume in (None, "", "none"):
        return None
    auto = cfg.resume == "auto"
    path = find_auto_checkpoint(Path(cfg.paths.resume_dir), current_overrides()) if auto else str(cfg.resume)
    if path is not None:
        check_checkpoint(path, model_config, task_name, field="resume")
    return path


def continue_checkpoints_in(cfg: DictConfig, ckpt_path: str) -> None:
    """Point ``paths.checkpoint_dir`` at the resumed checkpoint's folder (best / last tracking carries on)."""
    with open_dict(cfg):
        cfg.paths.checkpoint_dir = str(Path(ckpt_path).resolve().parent)


WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"


def continue_wandb_run(cfg: DictConfig, ckpt_path: str) -> str | None:
    """Point the configured W&B logger (``id: null``) at the run id the checkpoint keeps (the ``WandbRunId``
    callback), with ``resume="allow"``: the resumed run's metrics go on in the same W&B run. Returns the id."""
    loggers = [node for node in (cfg.get("logger") or {}).values() if node and node.get("_target_") == WANDB_LOGGER]
    if not loggers:
        return None
    run_id = read_checkpoint(ckpt_path, field="resume").get(WANDB_RUN_ID_KEY)
    if not run_id:
        return None
    with open_dict(cfg):
        for node in loggers:
            if not node.get("id"):
                node.id, node.resume = run_id, "allow"
    log.info("resume: W&B run %s continues", run_id)
    return str(run_id)
