"""Knowledge distillation (Hinton et al. 2015) from a teacher checkpoint: ``distillation=kd``.

The student's loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task loss``, where ``_T`` are
the softmaxes at temperature ``T``; ``T^2`` keeps the soft term's gradients the same size whatever ``T``. The task
loss is the task's own (the sequence task's distance-weighted cross-entropy, the LM's cross-entropy; with early
exit, its per-layer losses), and the KL term compares the student's output with the teacher's at every position.

This module holds the loss (``kd_loss``) and the :class:`Distiller` that adds it to a task's loss around a
frozen teacher model. The callback that loads the teacher from its checkpoint and attaches a Distiller while the
student fits needs the tasks, so it lives with them (``tiny_decoder.tasks.callbacks.KnowledgeDistillation``).
The teacher is not a submodule of the student, so it is never trained, moved by the optimizer or saved in the
student's checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
