"""Checkpoints, in one place: the task registry, the metadata a task writes into every checkpoint, reading a
checkpoint (always ``weights_only=True``), checking it against a config, and rebuilding the task it holds.

A checkpoint is Lightning's dict plus ``checkpoint["tiny_decoder"] = {"format": 2, "task": NAME}``; the model
config lives once, in ``hyper_parameters["model"]`` (what rebuilds the task). Format 1 (before the one-way
layout) also kept a second copy in ``tiny_decoder.model``; those checkpoints still load
(``tests/fixtures/v1_*.ckpt``). Every way a checkpoint can be unusable — missing, truncated, corrupt, not this
project's, another task or model — is a :class:`CheckpointError` whose message names the field it came from
(``ckpt=``, ``resume=``, ``distillation.teacher_ckpt=``) and the fix.

The task modules register their classes in :data:`TASKS`; importing ``tiny_decoder.tasks`` registers them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch

from tiny_decoder.core.errors import CheckpointError
from tiny_decoder.core.registry import Registry
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.training.pruning import conform_to_state_dict

TASKS = Registry("task.name", group="task")
METADATA_KEY = "tiny_decoder"
FORMAT = 2


def metadata(task_name: str) -> dict[str, Any]:
    """What a task adds to each checkpoint it saves (``checkpoint[METADATA_KEY]``)."""
    return {"format": FORMAT, "task": task_name}


def read_checkpoint(path: str | Path, field: str = "ckpt", map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict at ``path``; CheckpointError when it is missing, unreadable or not this project's."""
    if not Path(path).is_file():
        raise CheckpointError(f"{field}={path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a damaged file: all mean the same to a user
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{field}={path}: cannot read this checkpoint ({reason}); it is truncated, corrupt or not a "
            "Lightning checkpoint"
        ) from error
    meta = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "task" not in meta or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{field}={path}: not a tiny_decoder training checkpoint (no 'tiny_decoder' metadata)")
    return checkpoint


def task_name(checkpoint: Mapping[str, Any]) -> str:
    return str(checkpoint[METADATA_KEY]["task"])


def stored_model_config(checkpoint: Mapping[str, Any]) -> ModelConfig:
    """The model config the checkpoint was trained with (options added since then get their defaults)."""
    return ModelConfig.from_dict(checkpoint["hyper_parameters"]["model"])


def model_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``model.<field>: <stored> in the checkpoint, <current> here`` for each field that differs."""
    theirs, ours = _flatten(stored), _flatten(current)
    missing = "(unset)"
    return [
        f"{key}: {theirs.get(key, missing)} in the checkpoint, {ours.get(key, missing)} here"
        for key in sorted(set(theirs) | set(ours))
        if theirs.get(key, missing) != ours.get(key, missing)
    ]


def shown(differences: list[str], most: int = 4) -> str:
    """The first ``most`` of :func:`model_differences`, joined for one error line."""
    return "; ".join(differences[:most]) + ("; ..." if len(differences) > most else "")


def _flatten(values: Mapping[str, Any], prefix: str = "model") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        flat.update(_flatten(value, name) if isinstance(value, Mapping) else {name: value})
    return flat


def check_checkpoint(
    path: str | Path,
    model_config: Mapping[str, Any] | None = None,
    task: str | None = None,
    field: str = "resume",
) -> dict[str, Any]:
    """The checkpoint at ``path``, after checking it holds ``task`` (a TASKS name) and the model ``model_config``
    describes; a CheckpointError naming ``field`` and the first differences otherwise."""
    checkpoint = read_checkpoint(path, field)
    if task is not None and task_name(checkpoint) != task:
        raise CheckpointError(
            f"{field}={path}: a checkpoint of task {task_name(checkpoint)!r}, this run trains {task!r}"
        )
    stored = stored_model_config(checkpoint).to_dict()
    differences = model_differences(stored, model_config) if model_config is not None else []
    if differences:
        raise CheckpointError(
            f"{field}={path}: the checkpoint's model differs from this config: {shown(differences)} (use the same "
            "model options, or start a fresh run)"
        )
    return checkpoint


# model options that change neither the weights nor the function they compute, so a run may start from trained
# weights with other values: regularisation, the init (overwritten) and the depth policy (layerdrop / early exit)
FREE_FOR_INIT = ("model.dropout", "model.attention_dropout", "model.init_std", "model.depth")


def check_same_model(checkpoint: Mapping[str, Any], task: Any, path: str | Path, field: str) -> None:
    """A CheckpointError naming the first model options (other than :data:`FREE_FOR_INIT`) where this run's model
    differs from the one the checkpoint holds: the same shapes can hold another function (gelu vs relu, other
    positions, norms, eps)."""
    config = getattr(task, "model_config", None)
    if config is None:
        return
    differences = [
        difference
        for difference in model_differences(stored_model_config(checkpoint).to_dict(), config.to_dict())
        if not difference.startswith(FREE_FOR_INIT)
    ]
    if differences:
        raise CheckpointError(
            f"{field}={path}: the checkpoint's model differs from this run's: {shown(differences)} (set these model "
            "options as the checkpoint has them; only dropout, init_std and depth may differ)"
        )


def load_weights(task: Any, path: str | Path, field: str = "init_from") -> dict[str, Any]:
    """Load the weights of the checkpoint at ``path`` into ``task`` (a ``DecoderTask`` built from this run's
    config): a run that starts from trained weights (``init_from=``: pruning or fine-tuning a trained model,
    other inference options such as an early-exit threshold). The task and the shapes must match; options that
    do not change the weights (dropout, depth thresholds, pruning) may differ. Returns the checkpoint."""
    checkpoint = read_checkpoint(path, field)
    name = getattr(task, "task_name", None)
    if name is not None and task_name(checkpoint) != name:
        raise CheckpointError(
            f"{field}={path}: a checkpoint of task {task_name(checkpoint)!r}, this run trains {name!r}"
        )
    check_same_model(checkpoint, task, path, field)
    state = checkpoint["state_dict"]
    conform_to_state_dict(task, state)
    try:
        task.load_state_dict(state)
    except RuntimeError as error:
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise CheckpointError(
            f"{field}={path}: its weights do not fit this model ({details}); start from a checkpoint of the same "
            "architecture (model.* sizes, activation, positional encoding, norm)"
        ) from error
    return checkpoint


def load_task(path: str | Path, map_location: Any = "cpu", field: str = "ckpt") -> Any:
    """Rebuild the trained task (a ``DecoderTask``) of the checkpoint at ``path``, in eval mode; pruned models
    (masks, removed heads) are shaped like the one that was saved before the weights load."""
    checkpoint = read_checkpoint(path, field, map_location)
    task_cls = TASKS.get(task_name(checkpoint))
    task = task_cls(**checkpoint["hyper_parameters"])
    conform_to_state_dict(task, checkpoint["state_dict"])
    task.load_state_dict(checkpoint["state_dict"])
    return task.eval()


def save_weights_checkpoint(task: Any, path: str | Path) -> Path:
    """Write ``task`` (a ``DecoderTask``) as a weights-only checkpoint that :func:`load_task`, ``init_from=``,
    the tools and distillation (as a teacher) read like a trained one: Lightning's ``state_dict`` and
    ``hyper_parameters`` plus this project's metadata, no optimizer or loop state (not a ``resume=`` point).
    Written to a temporary file and renamed, so a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        METADATA_KEY: metadata(TASKS.name_of(type(task))),
        "pytorch-lightning_version": lightning.__version__,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
