"""Building a run from its config: seed, data module, model config (checked against the data), task, resume
checkpoint, callbacks, loggers and trainer (``build_run``), so ``fit`` and the benchmarks start from the same
objects."""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from tiny_decoder.run.config_checks import (
    build_model_config,
    check_added_keys,
    check_cpu_processes,
    resolved_dict,
    validate_config,
)
from tiny_decoder.run.memory import plan_memory
from tiny_decoder.run.resume import continue_checkpoints_in, continue_wandb_run, current_overrides, resolve_resume
from tiny_decoder.tasks.checkpoint import load_weights, read_checkpoint

if TYPE_CHECKING:
    from tiny_decoder.tasks.base import DecoderTask

log = logging.getLogger(__name__)


def instantiate_named(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers); skip nulls."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


@dataclass
class Run:
    """What ``train(cfg)`` builds before fitting (also used by ``benchmarks/training.py``)."""

    datamodule: L.LightningDataModule
    task: DecoderTask
    trainer: L.Trainer
    ckpt_path: str | None  # the checkpoint to resume from


def build_run(cfg: DictConfig, extra_callbacks: Iterable[L.Callback] = ()) -> Run:
    """Seed, then data module, task (its weights from ``init_from`` when set; compiled under ``compile=true``),
    resume checkpoint and trainer; checks the configuration before anything is trained. ``cfg`` may be updated
    (a resumed run's checkpoint folder)."""
    validate_config(cfg)
    check_added_keys(cfg, current_overrides() or [])
    check_cpu_processes(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all", **init_tokenizer(cfg))
    model_config = build_model_config(cfg, datamodule)
    plan_memory(cfg, model_config, datamodule)  # shrink_batch_to_gb, then a warning over budget_gb
    task = instantiate(
        cfg.task,
        model=model_config,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        _convert_="all",
    )
    if cfg.get("init_from"):
        load_weights(task, str(cfg.init_from), field="init_from")
    set_threads(cfg.get("torch_threads"), task.model.num_parameters())
    set_mmap_threshold(cfg.get("malloc_mmap_threshold_mb"))
    if cfg.get("compile"):
        options = compile_options(cfg)
        log.info(
            "compile=true: torch.compile%s of the training step and the evaluation forward; the first training "
            "and validation steps compile (tens of seconds)",
            f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "",
        )
        task.compile_steps(**options)
    ckpt_path = resolve_resume(cfg, model_config, getattr(task, "task_name", None))
    if ckpt_path:
        continue_checkpoints_in(cfg, ckpt_path)
        continue_wandb_run(cfg, ckpt_path)
    callbacks = [*instantiate_named(cfg.get("callbacks")), *extra_callbacks]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_named(cfg.get("logger")), **trainer_overrides(cfg)
    )
    return Run(datamodule, task, trainer, ckpt_path)


# below this many parameters a training step is a few small matmuls: a second intra-op thread mostly waits on
# the first, and on a busy 2-core machine it stalls the step (issue: 69 vs 2,030 steps in 15 s for the card's model)
SMALL_MODEL_PARAMETERS = 1_000_000


def init_tokenizer(cfg: DictConfig) -> dict[str, str]:
    """``{"tokenizer_json": ...}`` for the text data of a run that starts from ``init_from``'s language model when
    the data names no tokenizer: its token ids must mean what they meant to the trained (or imported) weights, so
    the data is tokenized with the checkpoint's tokenizer, not a new one."""
    data = cfg.get("data") or {}
    if (
        not cfg.get("init_from")
        or "tokenizer_path" not in data
        or data.get("tokenizer_path")
        or data.get("tokenizer_json")
    ):
        return {}
    tokenizer_json = read_checkpoint(str(cfg.init_from), "init_from")["hyper_parameters"].get("tokenizer_json")
    if tokenizer_json:
        log.info("init_from: the data is tokenized with the checkpoint's tokenizer")
    return {"tokenizer_json": tokenizer_json} if tokenizer_json else {}


def set_threads(torch_threads: int | str | None, parameters: int) -> int:
    """``torch_threads``: a number, ``auto`` (1 thread for a model under :data:`SMALL_MODEL_PARAMETERS`, torch's
    default otherwise) or null (torch's default). Returns the threads in use."""
    if torch_threads == "auto":
        torch_threads = 1 if parameters < SMALL_MODEL_PARAMETERS else None
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    return torch.get_num_threads()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def set_mmap_threshold(megabytes: float | None) -> bool:
    """``malloc_mmap_threshold_mb``: glibc maps every allocation of at least this size on its own and unmaps it when
    freed. Its default threshold grows to 32 MiB after the first large free, after which a step's many
    freed 1-32 MiB activations stay in the heap's holes: one stories260K training step (batch 128) peaked at
    4.9 GB resident with it against 2.9 GB with a fixed 1 MiB (same speed within noise). True when set (Linux,
    glibc); null leaves glibc's default."""
    if megabytes is None or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(float(megabytes) * 2**20)))


def compile_options(cfg: DictConfig) -> dict[str, Any]:
    """``torch.compile`` keyword arguments from ``compile_options`` (null, or null entries: torch's defaults)."""
    node = cfg.get("compile_options")
    options = resolved_dict(node) if node else {}
    return {key: value for key, value in options.items() if value is not None}


def trainer_overrides(cfg: DictConfig) -> dict[str, Any]:
    """Top-level shortcuts for Trainer arguments: ``precision=bf16-mixed`` sets ``trainer.precision``."""
    return {} if cfg.get("precision") is None else {"precision": cfg.precision}
