"""What a step does tensor by tensor: how far it perturbs each one, which ones it perturbs, and the
sensitivity scores that both can follow.

- ``epsilon`` (:data:`EPSILONS`): ``fixed`` (``eps`` for every tensor), ``relative`` (``eps`` scaled by the
  tensor's RMS over the model's RMS) or ``sensitivity`` (``eps`` scaled by the inverse of the tensor's
  sensitivity, so each tensor moves the loss by about as much); adaptive ratios are clamped to ``epsilon_range``.
- ``tensors`` (:data:`TENSOR_SAMPLERS`): ``all``, ``uniform`` (a random ``tensor_fraction`` of them) or
  ``sensitivity`` (sampled in proportion to their sensitivity scores). Unsampled tensors are not updated that
  step (block-coordinate descent; no inverse-probability reweighting).
- :class:`Sensitivity` (``optimizer.sensitivity``): every ``every`` steps each tensor is probed alone (score: an
  EMA estimate of ``||dL/dtheta_t||``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tiny_decoder.core.checks import check_int, check_number
from tiny_decoder.core.registry import Registry
from tiny_decoder.core.seeds import mix_seed
from tiny_decoder.training.zeroth_order.directions import RandomDirection
from tiny_decoder.training.zeroth_order.evaluators import CentralDifference, ParameterSet, ReplayedClosure

EPSILONS = Registry("optimizer.epsilon", group="optimizer.epsilon")
TENSOR_SAMPLERS = Registry("optimizer.tensors", group="optimizer.tensors")

UNIFORM_MIX = 0.1  # share of uniform probability mixed into sensitivity-proportional tensor sampling


# ---------------------------------------------------------------------------------------------------
# Epsilon per tensor


def _clamped(eps: float, ratios: torch.Tensor, bounds: tuple[float, float]) -> list[float]:
    return (eps * ratios.nan_to_num(nan=1.0).clamp(*bounds)).tolist()


@EPSILONS.register("fixed")
def fixed_epsilon(
    tensors: Sequence[torch.Tensor], eps: float, bounds: tuple[float, float], scores: torch.Tensor | None
) -> list[float]:
    return [eps] * len(tensors)


@EPSILONS.register("relative")
def relative_epsilon(
    tensors: Sequence[torch.Tensor], eps: float, bounds: tuple[float, float], scores: torch.Tensor | None
) -> list[float]:
    """``eps * rms(theta_t) / rms(theta)``: bigger steps for tensors with bigger entries (norm gains)."""
    squares = torch.stack([t.detach().norm().double() for t in tensors]).cpu().square()  # no copy of a tensor
    sizes = torch.tensor([t.numel() for t in tensors], dtype=torch.float64)
    overall = (squares.sum() / sizes.sum()).sqrt().clamp_min(1e-30)
    return _clamped(eps, (squares / sizes).sqrt() / overall, bounds)


@EPSILONS.register("sensitivity")
def sensitivity_epsilon(
    tensors: Sequence[torch.Tensor], eps: float, bounds: tuple[float, float], scores: torch.Tensor | None
) -> list[float]:
    """``eps * mean(s) / s_t`` (geometric mean): each tensor's perturbation changes the loss about equally."""
    if scores is None or not (scores > 0).any():
        return fixed_epsilon(tensors, eps, bounds, scores)
    mean_log = scores[scores > 0].log().mean()  # tensors with a zero score get the upper bound
    return _clamped(eps, (mean_log - scores.log()).exp(), bounds)


# ---------------------------------------------------------------------------------------------------
# Which tensors a step perturbs


def _count(n: int, fraction: float) -> int:
    return max(1, min(n, round(fraction * n)))


@TENSOR_SAMPLERS.register("all")
def all_tensors(n: int, fraction: float, scores: torch.Tensor | None, generator: torch.Generator) -> list[int]:
    return list(range(n))


@TENSOR_SAMPLERS.register("uniform")
def uniform_tensors(n: int, fraction: float, scores: torch.Tensor | None, generator: torch.Generator) -> list[int]:
    return sorted(torch.randperm(n, generator=generator)[: _count(n, fraction)].tolist())


@TENSOR_SAMPLERS.register("sensitivity")
def sensitive_tensors(n: int, fraction: float, scores: torch.Tensor | None, generator: torch.Generator) -> list[int]:
    """Sampled without replacement with probability ~ score (plus ``UNIFORM_MIX`` of uniform)."""
    if scores is None or not scores.sum() > 0:
        return uniform_tensors(n, fraction, scores, generator)
    probabilities = (1 - UNIFORM_MIX) * scores / scores.sum() + UNIFORM_MIX / n
    return sorted(torch.multinomial(probabilities, _count(n, fraction), generator=generator).tolist())


# ---------------------------------------------------------------------------------------------------
# Sensitivity scores


@dataclass
class Sensitivity:
    """Per-tensor sensitivity ``||dL/dtheta_t||``: every ``every`` steps each tensor is probed alone with a
    central SPSA difference ``p_t ~ g_t . z_t`` (``E[p_t^2] = ||g_t||^2``); the score is ``sqrt(EMA(p_t^2))``.
    Costs two evaluations per tensor per probe; ``every: 0`` disables it."""

    every: int = 0
    ema: float = 0.9

    def __post_init__(self) -> None:
        check_int("optimizer.sensitivity.every", self.every, 0)
        check_number("optimizer.sensitivity.ema", self.ema, 0, 1, high_open=True)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def probe(
        self,
        params: ParameterSet,
        evaluate: Callable[..., torch.Tensor],
        loss_fn: ReplayedClosure,
        eps: Sequence[float],
        state: dict[str, Any],
        seed: int,
    ) -> torch.Tensor:
        directions = [RandomDirection(mix_seed(seed, t), (t,), "gaussian") for t in range(len(params.tensors))]
        scheme = CentralDifference()
        values = evaluate(params, directions, scheme.offsets, eps, loss_fn)
        projected = scheme.difference(values, None).double().cpu() / torch.tensor(eps, dtype=torch.float64)
        previous = state.get("sensitivity")
        squares = projected.square()
        state["sensitivity"] = squares if previous is None else self.ema * previous + (1 - self.ema) * squares
        return state["sensitivity"].sqrt()
