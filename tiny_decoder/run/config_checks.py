"""Checks of a training config before anything is built: the training options' ranges (one table,
checked with ``core.checks``), and the model against its data (context, vocabulary), all as ``ConfigError``s
that name the field and the fix."""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from hydra._internal.utils import _locate
from omegaconf import DictConfig, OmegaConf

from tiny_decoder.core.checks import (
    check,
    is_betas,
    is_bool,
    is_count,
    is_non_negative,
    is_positive,
    is_positive_int,
)
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.validation import validate_model_config

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
    ("torch_threads", lambda v: v == "auto" or is_positive_int(v), "a positive integer, auto or null"),
    ("budget_gb", is_positive, "a positive number of GiB (or null: available RAM / GPU memory)"),
    ("shrink_batch_to_gb", is_positive, "a positive number of GiB (or null: keep data.batch_size)"),
    ("malloc_mmap_threshold_mb", is_positive, "a positive number of MiB (or null: glibc's default)"),
    ("allow_cpu_oversubscription", is_bool, "true or false"),
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


def cpu_training(cfg: DictConfig) -> bool:
    """The trainer runs on the CPU: ``trainer.accelerator=cpu``, or ``auto`` with no GPU here."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    gpu = torch.cuda.is_available() or (torch.backends.mps.is_available() and accelerator == "auto")
    return accelerator == "cpu" or (accelerator == "auto" and not gpu)


def check_cpu_processes(cfg: DictConfig, cores: int | None = None) -> None:
    """Refuse more CPU training processes x threads than this machine has cores (``trainer=ddp
    trainer.devices=4`` with no GPU: 4 processes on 2 cores), unless ``allow_cpu_oversubscription``."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if not isinstance(devices, int) and not (isinstance(devices, str) and devices.isdigit()):
        return  # auto (one process on a CPU), a list of device ids or -1: Lightning decides
    processes = int(devices) * int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)
    if processes <= 1 or not cpu_training(cfg) or cfg.get("allow_cpu_oversubscription"):
        return
    threads = cfg.get("torch_threads")
    per_process = int(threads) if isinstance(threads, int) and not isinstance(threads, bool) else 1
    cores = cores or os.cpu_count() or 1
    if processes * per_process > cores:
        gpu = "" if str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")) == "cpu" else " (no GPU found)"
        threads_note = f" x {per_process} threads" if per_process > 1 else ""
        raise ConfigError(
            f"trainer.devices={devices} starts {processes} CPU training processes{threads_note}{gpu} on this "
            f"machine's {cores} cores: use trainer=cpu (one process) or trainer.devices<={cores // per_process or 1}, "
            "or allow_cpu_oversubscription=true to start them anyway"
        )


def check_argument(node: str, target: str, name: str) -> None:
    """Refuse ``name`` when the component ``target`` (a ``_target_``) takes no such argument (and no **kwargs)."""
    try:
        parameters = inspect.signature(_locate(target)).parameters
    except (ImportError, ValueError, TypeError):  # not introspectable: instantiate will say
        return
    if name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    close = difflib.get_close_matches(name, list(parameters), n=3)
    hint = f"; did you mean {', '.join(f'{node}.{c}' for c in close)}?" if close else ""
    raise ConfigError(f"+{node}.{name}: {target} takes no argument {name!r}{hint}")


# the model and its parts: ModelConfig and the part registries refuse an unknown option with their own message
SELF_CHECKED = ("model", "activation", "norm", "attention", "positional", "depth")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the config groups (a `+group=option` is no key)
# nodes whose entries are themselves instantiated components: a new entry is a new component (its _target_ says)
COMPONENT_COLLECTIONS = ("callbacks", "logger")


def check_added_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse a ``+key=value`` that nothing reads: a new key is read only inside a node that is instantiated
    (it has a ``_target_``: the component takes it as an argument, and refuses it if unknown) or as a new entry of
    ``callbacks`` / ``logger``. ``+trainer.profiler=simple`` passes; ``+some_misspelled_key=1`` does not."""
    for override in overrides:
        if not override.startswith("+") or "=" not in override:
            continue
        key = override.lstrip("+").split("=", 1)[0]
        parent, _, name = key.rpartition(".")
        if (CONF_DIR / key.replace(".", "/")).is_dir():  # +experiment=NAME, +hparams_search=...: a config group
            continue
        if key.split(".", 1)[0] in (*COMPONENT_COLLECTIONS, *SELF_CHECKED, "hydra") or name == "_target_":
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and "_target_" in node:
            check_argument(parent, str(node._target_), name)
            continue
        known = [k for k in (node.keys() if isinstance(node, DictConfig) else []) if k != name]
        close = difflib.get_close_matches(name, [str(k) for k in known], n=3)
        hint = f"; did you mean {', '.join((parent + '.' if parent else '') + c for c in close)}?" if close else ""
        raise ConfigError(
            f"+{key}: nothing reads {key!r} (it is not a field of the config{' node ' + parent if parent else ''}, "
            f"and {parent or 'the root'} is not a component that takes extra arguments){hint}"
        )


def resolved_dict(node: Any) -> dict[str, Any]:
    """``node`` (a config mapping) as a plain resolved dict (``OmegaConf.to_container`` is typed for any node)."""
    container = OmegaConf.to_container(node, resolve=True)
    assert isinstance(container, dict), f"expected a config mapping, got {type(container).__name__}"
    return cast("dict[str, Any]", container)  # a config mapping's keys are its field names


def build_model_config(cfg: DictConfig, datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The resolved model config with ``vocab_size`` / ``context_length`` taken from the data when null;
    fails when the data does not fit the model (longer sequences than its positions, more token ids)."""
    model = resolved_dict(cfg.model)
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
