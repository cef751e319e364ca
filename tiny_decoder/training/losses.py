"""Loss functions shared by the tasks.

``distance_weighted_cross_entropy`` is the sequence predictor's loss from its design card: per-position
cross-entropy multiplied by ``1 + alpha * w(|pred - true|)``, where ``w`` is the distance weighting
(linear, quadratic, sqrt) and ``pred`` is either the argmax class (a per-position weight with no gradient
of its own) or the expected value under the softmax (differentiable, pulls probability mass towards the
right number). All positions count; the result is the mean over batch and positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tiny_decoder.core.registry import Registry

DISTANCE_WEIGHTINGS = Registry("task.loss.weighting", group="task.loss.weighting")
PREDICTIONS = Registry("task.loss.prediction", group="task.loss.prediction")


DISTANCE_WEIGHTINGS.register("linear")(lambda d: d)
DISTANCE_WEIGHTINGS.register("quadratic")(lambda d: d * d)
DISTANCE_WEIGHTINGS.register("sqrt")(torch.sqrt)


@PREDICTIONS.register("argmax")
def argmax_prediction(logits: torch.Tensor) -> torch.Tensor:
    """The most likely class as a float value (no gradient)."""
    return logits.argmax(dim=-1).to(logits.dtype)


@PREDICTIONS.register("expected")
def expected_prediction(logits: torch.Tensor) -> torch.Tensor:
    """``sum_k k * softmax(logits)_k``: differentiable."""
    values = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    return torch.softmax(logits, dim=-1) @ values


def distance_weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.1,
    weighting: str | Callable[[torch.Tensor], torch.Tensor] = "linear",
    prediction: str | Callable[[torch.Tensor], torch.Tensor] = "argmax",
) -> torch.Tensor:
    """``mean(CE * (1 + alpha * weighting(|prediction(logits) - target|)))`` over all positions.

    ``logits``: ``(..., C)``; ``targets``: ``(...)`` integer classes whose index is also their value.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    weight_fn = DISTANCE_WEIGHTINGS.get(weighting) if isinstance(weighting, str) else weighting
    predict_fn = PREDICTIONS.get(prediction) if isinstance(prediction, str) else prediction
    ce = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none").view_as(targets)
    distance = (predict_fn(logits.float()) - targets.float()).abs()
    return (ce * (1 + alpha * weight_fn(distance))).mean()


def next_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ``(B, T, V)`` logits and ``(B, T)`` targets (in fp32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
