"""Perturbation directions and the gradient estimators built on them.

- ``distribution`` of ``z`` (:data:`DISTRIBUTIONS`): ``gaussian`` or ``rademacher`` (both have ``E[z z^T] = I``).
- Directions (:class:`Direction`): :class:`RandomDirection` (``z`` regenerated tensor by tensor from a seed,
  never stored), :class:`CoordinateDirection` (one coordinate's unit vector) and :class:`DenseDirection` (a
  materialised one: the dense momentum buffer); ``encode_direction`` / ``decode_direction`` give the first two a
  checkpoint-safe form.
- ``estimator`` (:data:`ESTIMATORS`): ``spsa`` -- ``g ~ mean_k (d_k / eps) z_k`` over ``directions`` random
  directions (n-SPSA; ``directions: 1`` is MeZO); ``coordinate`` -- one difference per coordinate, over
  ``coordinates`` sampled coordinates per step (``null``: all of them, the exact finite-difference gradient).
- :class:`Estimate`: one step's estimate as directions and coefficients, never a dense gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass
from itertools import accumulate
from typing import Any, ClassVar, Protocol

import torch

from tiny_decoder.core.checks import check, is_positive_int
from tiny_decoder.core.registry import Registry
from tiny_decoder.core.seeds import mix_seed, seeded_generator

Scales = Mapping[int, float]  # tensor index -> multiplier of that tensor's direction component

ESTIMATORS = Registry("optimizer.estimator", group="optimizer.estimator")
DISTRIBUTIONS = Registry("optimizer.distribution", group="optimizer.distribution")
DIRECTIONS = Registry("zeroth-order direction kind")


# ---------------------------------------------------------------------------------------------------
# Direction distributions and directions


@DISTRIBUTIONS.register("gaussian")
def gaussian(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


@DISTRIBUTIONS.register("rademacher")
def rademacher(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    signs = torch.randint(0, 2, like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return signs.mul_(2).sub_(1)


class Direction(Protocol):
    """A perturbation direction over some of the parameter tensors (indices into the optimizer's list)."""

    @property
    def tensors(self) -> tuple[int, ...]: ...

    def component(self, index: int, param: torch.Tensor) -> torch.Tensor: ...

    def add_to(self, tensors: Sequence[torch.Tensor], scales: Scales) -> None: ...


@DIRECTIONS.register("random")
@dataclass(frozen=True)
class RandomDirection:
    """``z`` drawn tensor by tensor from ``seed``: regenerated whenever needed, never stored."""

    seed: int
    tensors: tuple[int, ...]
    distribution: str
    kind: ClassVar[str] = "random"

    def component(self, index: int, param: torch.Tensor) -> torch.Tensor:
        generator = seeded_generator(mix_seed(self.seed, index), param.device)
        return DISTRIBUTIONS.get(self.distribution)(generator, param)

    def add_to(self, tensors: Sequence[torch.Tensor], scales: Scales) -> None:
        """``tensors[t] += scales[t] * z_t`` in place, one tensor's ``z_t`` alive at a time."""
        for t in self.tensors:
            tensors[t].add_(self.component(t, tensors[t]), alpha=scales[t])


@DIRECTIONS.register("coordinate")
@dataclass(frozen=True)
class CoordinateDirection:
    """The unit vector of one coordinate (flat ``index``) of tensor ``tensor``."""

    tensor: int
    index: int
    kind: ClassVar[str] = "coordinate"

    @property
    def tensors(self) -> tuple[int, ...]:
        return (self.tensor,)

    def component(self, index: int, param: torch.Tensor) -> torch.Tensor:
        unit = torch.zeros_like(param)
        unit.view(-1)[self.index] = 1
        return unit

    def add_to(self, tensors: Sequence[torch.Tensor], scales: Scales) -> None:
        tensors[self.tensor].view(-1)[self.index] += scales[self.tensor]


@dataclass(frozen=True)
class DenseDirection:
    """A materialised direction (the dense momentum buffer): ``parts[t]`` for each tensor index ``t``."""

    parts: dict[int, torch.Tensor]

    @property
    def tensors(self) -> tuple[int, ...]:
        return tuple(self.parts)

    def component(self, index: int, param: torch.Tensor) -> torch.Tensor:
        return self.parts[index]

    def add_to(self, tensors: Sequence[torch.Tensor], scales: Scales) -> None:
        for t, part in self.parts.items():
            tensors[t].add_(part, alpha=scales[t])


# the directions an estimator samples (what an :class:`Estimate` holds): both have a checkpoint-safe form
EncodableDirection = RandomDirection | CoordinateDirection


def encode_direction(direction: EncodableDirection) -> list[Any]:
    """A checkpoint-safe (primitives only) form of a seeded or coordinate direction."""
    return [direction.kind, *(list(v) if isinstance(v, tuple) else v for v in astuple(direction))]


def decode_direction(encoded: Sequence[Any]) -> EncodableDirection:
    kind, *fields = encoded
    return DIRECTIONS.get(kind)(*(tuple(v) if isinstance(v, list) else v for v in fields))


# ---------------------------------------------------------------------------------------------------
# Estimators: which directions a step probes and how their differences combine


@ESTIMATORS.register("spsa")
class SPSA:
    """n-SPSA: ``g ~ (1/n) sum_k (d_k / eps) z_k``; unbiased up to O(eps^2) since ``E[z z^T] = I``."""

    def __init__(self, directions: int = 1, distribution: str = "gaussian", coordinates: int | None = None):
        check("optimizer.directions", directions, is_positive_int, "a positive integer")
        DISTRIBUTIONS.get(distribution)
        self.directions = directions
        self.distribution = distribution

    def sample(
        self, seed: int, tensors: Sequence[int], params: Sequence[torch.Tensor], generator: torch.Generator
    ) -> list[EncodableDirection]:
        return [RandomDirection(mix_seed(seed, k), tuple(tensors), self.distribution) for k in range(self.directions)]

    def normalizer(self, count: int) -> int:
        return count  # the estimate is the mean over directions

    def decrease_rate(self, projected: torch.Tensor) -> torch.Tensor:
        """Estimated ``g . g_hat`` (the first-order loss decrease per unit step)."""
        return projected.square().mean()


@ESTIMATORS.register("coordinate")
class Coordinatewise:
    """One difference per coordinate: ``g_i ~ d_i / eps`` on ``coordinates`` sampled coordinates a step."""

    def __init__(self, directions: int = 1, distribution: str = "gaussian", coordinates: int | None = None):
        check(
            "optimizer.coordinates",
            coordinates,
            lambda v: v is None or is_positive_int(v),
            "a positive integer or null (all)",
        )
        self.coordinates = coordinates

    def sample(
        self, seed: int, tensors: Sequence[int], params: Sequence[torch.Tensor], generator: torch.Generator
    ) -> list[EncodableDirection]:
        """``coordinates`` coordinates drawn uniformly (without replacement) over the entries of ``tensors``."""
        sizes = [params[t].numel() for t in tensors]
        total = sum(sizes)
        count = total if self.coordinates is None else min(self.coordinates, total)
        flat = torch.arange(total) if count == total else torch.randperm(total, generator=generator)[:count].sort()[0]
        starts = torch.tensor([0, *accumulate(sizes)])
        owners = torch.searchsorted(starts, flat, right=True) - 1
        local = flat - starts[owners]
        return [CoordinateDirection(tensors[o], i) for o, i in zip(owners.tolist(), local.tolist(), strict=True)]

    def normalizer(self, count: int) -> int:
        return 1  # each coordinate is its own component of the estimate

    def decrease_rate(self, projected: torch.Tensor) -> torch.Tensor:
        return projected.square().sum()


# ---------------------------------------------------------------------------------------------------
# One step's estimate


Components = list[tuple[Direction, dict[int, float]]]


@dataclass
class Estimate:
    """One step's estimate ``g_hat_t = sum_k coefficients[k] / eps[t] * z_(k,t)``."""

    directions: list[EncodableDirection]
    coefficients: torch.Tensor
    eps: list[float]

    def components(self, weight: float = 1.0) -> Components:
        """``(direction, {t: multiplier of z_t})`` pairs whose sum is ``weight * g_hat``."""
        coefficients = self.coefficients.tolist()
        return [
            (d, {t: weight * c / self.eps[t] for t in d.tensors})
            for d, c in zip(self.directions, coefficients, strict=True)
        ]

    def encode(self) -> dict[str, Any]:
        return {
            "directions": [encode_direction(d) for d in self.directions],
            "coefficients": self.coefficients.clone(),
            "eps": list(self.eps),
        }

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> Estimate:
        return cls([decode_direction(d) for d in data["directions"]], data["coefficients"], list(data["eps"]))
