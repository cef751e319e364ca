"""Callbacks that need a task: ``KnowledgeDistillation`` (``distillation=kd``) loads the teacher task from its
checkpoint when fitting starts, refuses one of another task, vocabulary (or tokenizer) or a shorter context, and
attaches a frozen :class:`~tiny_decoder.training.distillation.Distiller` to the student (``task.distiller``),
whose ``training_loss`` then adds the distillation term; it logs ``train/kd_loss`` and ``train/task_loss``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L

from tiny_decoder.core.checks import check, check_number, is_positive
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.tasks.checkpoint import load_task
from tiny_decoder.training.distillation import Distiller

if TYPE_CHECKING:
    from tiny_decoder.tasks.base import DecoderTask


def check_teacher(teacher: DecoderTask, student: DecoderTask, path: str) -> None:
    """Refuse a teacher the student cannot be compared with token by token (one line naming the mismatch)."""
    prefix = f"distillation.teacher_ckpt={path}"
    if teacher.task_name != student.task_name:
        raise ConfigError(
            f"{prefix}: a teacher of task {teacher.task_name!r} cannot teach a {student.task_name!r} task"
        )
    t_config, s_config = teacher.model_config, student.model_config
    if t_config.vocab_size != s_config.vocab_size:
        raise ConfigError(
            f"{prefix}: the teacher's vocabulary has {t_config.vocab_size} tokens, the student's "
            f"{s_config.vocab_size}; distillation compares the two distributions token by token"
        )
    t_tokenizer, s_tokenizer = (m.hparams.get("tokenizer_fingerprint") for m in (teacher, student))
    if t_tokenizer and s_tokenizer and t_tokenizer != s_tokenizer:
        raise ConfigError(f"{prefix}: the teacher's tokenizer ({t_tokenizer}) is not the student's ({s_tokenizer})")
    if t_config.context_length < s_config.context_length:
        raise ConfigError(
            f"{prefix}: the teacher's context ({t_config.context_length}) is shorter than the student's "
            f"({s_config.context_length})"
        )


class KnowledgeDistillation(L.Callback):
    """Attaches a frozen teacher to the task while it fits; logs ``train/kd_loss`` and ``train/task_loss``."""

    def __init__(self, teacher_ckpt: str | None = None, alpha: float = 0.5, temperature: float = 2.0):
        if not teacher_ckpt:
            raise ConfigError("distillation=kd needs the teacher: distillation.teacher_ckpt=PATH.ckpt")
        if not Path(teacher_ckpt).is_file():
            raise ConfigError(f"distillation.teacher_ckpt={teacher_ckpt}: no such checkpoint file")
        check_number("distillation.alpha", alpha, 0, 1)
        check("distillation.temperature", temperature, is_positive, "positive")
        self.teacher_ckpt, self.alpha, self.temperature = str(teacher_ckpt), float(alpha), float(temperature)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = cast("DecoderTask", pl_module)  # the callback of a task's distillation group
        field = "distillation.teacher_ckpt"
        teacher: DecoderTask = load_task(self.teacher_ckpt, map_location=pl_module.device, field=field)
        check_teacher(teacher, student, self.teacher_ckpt)
        student.distiller = Distiller(teacher.model, self.alpha, self.temperature)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        distiller = getattr(pl_module, "distiller", None)
        if distiller is not None and distiller.last:
            pl_module.log_dict({f"train/{name}": value for name, value in distiller.last.items()})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cast("DecoderTask", pl_module).distiller = None
