"""torchmetrics-based metrics of the tasks.

``GroupAccuracy`` is accuracy broken down by an integer group label (a sequence's phase or family), with
sum states so it reduces correctly across DDP ranks. ``SequenceMetrics`` bundles what the sequence
predictor reports: loss, accuracy over all positions and at the last one, mean absolute distance of the
argmax prediction, and last-position accuracy per phase and per family, each next to its random baseline.
``bits_per_byte`` converts a language model's loss in nats per token into bits per byte of text.
"""

from __future__ import annotations

import math
from typing import cast, overload

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

# A uniform random predictor over 256 classes: accuracy 1/256, expected |X - Y| for X, Y uniform on
# 0..255 is (n^2 - 1) / (3n) = 85.33, cross-entropy ln(256) = 5.545.
RANDOM_BASELINES = {"acc": 1 / 256, "mad": (256**2 - 1) / (3 * 256), "loss": math.log(256)}


@overload
def bits_per_byte(loss_nats: torch.Tensor, bytes_per_token: float) -> torch.Tensor: ...
@overload
def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float: ...
def bits_per_byte(loss_nats: float | torch.Tensor, bytes_per_token: float) -> float | torch.Tensor:
    """A mean cross-entropy in nats per token -> bits per UTF-8 byte of the text: ``loss * tokens / bytes / ln 2``
    (``bytes_per_token``: the split's UTF-8 bytes over its tokens, as a text data module reports it)."""
    tokens_per_byte = 1.0 / bytes_per_token
    return loss_nats * tokens_per_byte / math.log(2)


class GroupAccuracy(Metric):
    """Accuracy per group id in ``[0, n_groups)``; groups never seen report NaN."""

    full_state_update = False
    correct: torch.Tensor  # states (add_state)
    total: torch.Tensor

    def __init__(self, n_groups: int):
        super().__init__()
        self.n_groups = n_groups
        self.add_state("correct", torch.zeros(n_groups), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(n_groups), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, groups: torch.Tensor) -> None:
        self.correct.index_add_(0, groups, correct.to(self.correct.dtype))
        self.total.index_add_(0, groups, torch.ones_like(self.correct[groups]))

    def compute(self) -> torch.Tensor:
        return torch.where(self.total > 0, self.correct / self.total.clamp(min=1), torch.nan)


class SequenceMetrics(nn.Module):
    """All metrics of one evaluation split of the sequence predictor."""

    def __init__(self, family_names: list[str], n_phases: int = 3, num_classes: int = 256):
        super().__init__()
        self.family_names = list(family_names)
        self.loss = MeanMetric()
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.acc_last = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.mad = MeanAbsoluteError()
        self.phase_acc = GroupAccuracy(n_phases + 1)  # phases are 1-based
        self.family_acc = GroupAccuracy(len(self.family_names))

    def update(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        target = batch["target"]
        prediction = logits.argmax(dim=-1)
        self.loss.update(loss.detach(), weight=target.shape[0])
        self.acc.update(prediction.flatten(), target.flatten())
        self.acc_last.update(prediction[:, -1], target[:, -1])
        self.mad.update(prediction.float(), target.float())
        last_correct = prediction[:, -1] == target[:, -1]
        self.phase_acc.update(last_correct, batch["phase"])
        self.family_acc.update(last_correct, batch["family"])

    def compute(self, prefix: str) -> dict[str, torch.Tensor]:
        values = {
            f"{prefix}/loss": self.loss.compute(),
            f"{prefix}/acc": self.acc.compute(),
            f"{prefix}/acc_last": self.acc_last.compute(),
            f"{prefix}/mad": self.mad.compute(),
        }
        values.update({f"baseline/{name}": torch.tensor(value) for name, value in RANDOM_BASELINES.items()})
        for phase, acc in enumerate(self.phase_acc.compute().tolist()):
            if phase > 0 and not math.isnan(acc):
                values[f"{prefix}/phase{phase}_acc_last"] = torch.tensor(acc)
        for name, acc in zip(self.family_names, self.family_acc.compute().tolist(), strict=True):
            if not math.isnan(acc):
                values[f"{prefix}_family/{name}_acc_last"] = torch.tensor(acc)
        return values

    def reset(self) -> None:
        for metric in self.children():
            cast(Metric, metric).reset()  # every child is a torchmetrics Metric
