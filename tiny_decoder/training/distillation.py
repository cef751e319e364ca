"""Knowledge distillation (Hinton et al. 2015) from a teacher checkpoint: ``distillation=kd``.

The student's loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task loss``, where ``_T`` are
the softmaxes at temperature ``T``; ``T^2`` keeps the soft term's gradients the same size whatever ``T``. The task
loss is the task's own (the sequence task's distance-weighted cross-entropy, the LM's cross-entropy; with early
exit, its per-layer losses), and the KL term compares the student's output with the teacher's at every position.

:class:`KnowledgeDistillation` is a callback: when fitting starts it loads the teacher with ``load_task``, refuses
one of another task, vocabulary (or tokenizer) or a shorter context, freezes it in eval mode and attaches a
:class:`Distiller` to the task (``task.distiller``), whose ``training_loss`` adds the term. The teacher is not a
submodule of the student, so it is never trained, moved by the optimizer or saved in the student's checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from tiny_decoder.core.checks import check, check_number, is_positive
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model.transformer import DecoderTransformer


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over positions (``batchmean`` of
    the ``(N, V)`` rows, in fp32)."""
    student = F.log_softmax(student_logits.flatten(0, -2).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.flatten(0, -2).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


class Distiller:
    """Adds the distillation term to a task loss; the teacher runs in eval mode without gradients."""

    def __init__(self, teacher: DecoderTransformer, alpha: float, temperature: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature
        self.last: dict[str, torch.Tensor] = {}

    def combine(self, task_loss: torch.Tensor, student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(ids)
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        self.last = {"kd_loss": kd.detach(), "task_loss": task_loss.detach()}
        return self.alpha * kd + (1.0 - self.alpha) * task_loss


def check_teacher(teacher: L.LightningModule, student: L.LightningModule, path: str) -> None:
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
        from tiny_decoder.tasks import load_task  # the tasks import the training package

        teacher = load_task(self.teacher_ckpt, map_location=pl_module.device)
        check_teacher(teacher, pl_module, self.teacher_ckpt)
        pl_module.distiller = Distiller(teacher.model, self.alpha, self.temperature)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        distiller = getattr(pl_module, "distiller", None)
        if distiller is not None and distiller.last:
            pl_module.log_dict({f"train/{name}": value for name, value in distiller.last.items()})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.distiller = None
