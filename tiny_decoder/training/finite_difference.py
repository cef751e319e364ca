"""Zeroth-order (finite-difference) training: gradient estimates from loss differences, no backward pass.

The reference for the memory-efficient form is MeZO (Malladi et al. 2023, arXiv 2305.17333): SPSA with
the random direction regenerated from a seed, the parameters perturbed in place and restored, and no
stored gradient. :class:`ZerothOrderOptimizer` is a ``torch.optim.Optimizer`` (so LR schedulers,
checkpoints and Lightning work unchanged) whose ``step(closure)`` evaluates ``closure()`` -- the loss of
the model on one fixed batch -- at perturbed parameters and applies the estimated update. Plain torch::

    optimizer = ZerothOrderOptimizer(model.parameters(), lr=1e-3, directions=4)
    optimizer.bind(model)  # parameter names for logs; needed by parallel="vmap"
    loss = optimizer.step(lambda: loss_fn(model))

Every choice is a registry entry named by a config string (``optimizer.<key>`` in Hydra):

- ``estimator``: ``spsa`` -- ``g ~ mean_k (d_k / eps) z_k`` over ``directions`` random directions ``z_k``
  (n-SPSA; ``directions: 1`` is MeZO); ``coordinate`` -- one difference per coordinate, over
  ``coordinates`` sampled coordinates per step (``null``: all of them, the exact finite-difference gradient).
- ``distribution`` of ``z``: ``gaussian`` or ``rademacher`` (both have ``E[z z^T] = I``).
- ``scheme``: ``central`` ``(f(x + eps z) - f(x - eps z)) / 2`` (error O(eps^2), 2 evaluations a direction)
  or ``forward`` ``f(x + eps z) - f(x)`` (error O(eps), 1 evaluation a direction + 1 shared).
- ``epsilon``: ``fixed`` (``eps`` for every tensor), ``relative`` (``eps`` scaled by the tensor's RMS over
  the model's RMS) or ``sensitivity`` (``eps`` scaled by the inverse of the tensor's sensitivity, so each
  tensor moves the loss by about as much); adaptive ratios are clamped to ``epsilon_range``.
- ``tensors``: which tensors are perturbed a step: ``all``, ``uniform`` (a random ``tensor_fraction`` of
  them) or ``sensitivity`` (sampled in proportion to their sensitivity scores). Unsampled tensors are not
  updated that step (block-coordinate descent; no inverse-probability reweighting).
- ``parallel``: ``sequential`` (perturb in place and restore: MeZO's memory) or ``vmap`` (the perturbations
  of a chunk evaluated in one batched forward with ``torch.func.functional_call`` under ``vmap``; costs a
  stacked copy of the perturbed tensors per chunk).
- ``momentum_mode`` (with ``momentum > 0``): ``seeds`` replays the last ``history`` estimates from their
  seeds (no buffer; the truncated EMA ``(1 - b) sum_j b^j g_(k-j)``) or ``buffer`` (a dense EMA buffer per
  tensor: exact, but a full gradient-sized buffer).

``line_search`` backtracks the step along the estimated direction on the same batch; ``sensitivity``
probes each tensor alone every ``every`` steps (score: an EMA estimate of ``||dL/dtheta_t||``); ``hybrid``
holds the schedule that the Lightning glue (``training/manual_optimization.py``) uses to switch between
finite differences and backprop.

Invariants: each forward of a step sees the same batch (the closure) and the same RNG state (restored
before every evaluation); directions come from generators seeded by ``(seed, step, direction, tensor)``,
so a seed reproduces a run; with ``parallel: sequential`` and ``momentum_mode: seeds`` no gradient-sized
tensor nor copy of the parameters is ever allocated -- one tensor's direction at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from functools import partial
from itertools import accumulate
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.func import functional_call, vmap

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.core.registry import Registry
from tiny_decoder.core.seeds import mix_seed, seeded_generator

Closure = Callable[[], torch.Tensor]
Scales = Mapping[int, float]  # tensor index -> multiplier of that tensor's direction component

ESTIMATORS = Registry("optimizer.estimator", group="optimizer.estimator")
DISTRIBUTIONS = Registry("optimizer.distribution", group="optimizer.distribution")
SCHEMES = Registry("optimizer.scheme", group="optimizer.scheme")
EPSILONS = Registry("optimizer.epsilon", group="optimizer.epsilon")
TENSOR_SAMPLERS = Registry("optimizer.tensors", group="optimizer.tensors")
EVALUATORS = Registry("optimizer.parallel", group="optimizer.parallel")
MOMENTUM = Registry("optimizer.momentum_mode", group="optimizer.momentum_mode")
DIRECTIONS = Registry("zeroth-order direction kind")

PHASES = ("finite_difference", "backprop")  # the hybrid schedule's phases, run by the Lightning glue
STATE_KEY = "zeroth_order"  # this optimizer's own entry in ``optimizer.state`` (saved with checkpoints)
UNIFORM_MIX = 0.1  # share of uniform probability mixed into sensitivity-proportional tensor sampling
_SAMPLING_KEY = 0x5A4D  # seed-stream labels, so the sampling and direction streams never coincide
_PROBE_KEY = 0x5E25


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

    tensors: tuple[int, ...]

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


def encode_direction(direction: RandomDirection | CoordinateDirection) -> list[Any]:
    """A checkpoint-safe (primitives only) form of a seeded or coordinate direction."""
    return [direction.kind, *(list(v) if isinstance(v, tuple) else v for v in astuple(direction))]


def decode_direction(encoded: Sequence[Any]) -> RandomDirection | CoordinateDirection:
    kind, *fields = encoded
    return DIRECTIONS.get(kind)(*(tuple(v) if isinstance(v, list) else v for v in fields))


# ---------------------------------------------------------------------------------------------------
# Difference schemes


@SCHEMES.register("central")
class CentralDifference:
    """``(f(x + eps z) - f(x - eps z)) / 2 = eps g.z + O(eps^3)``; ``f(x)`` estimated by the mean."""

    offsets = (1.0, -1.0)
    needs_base = False

    def difference(self, values: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        return (values[:, 0] - values[:, 1]) / 2

    def loss(self, values: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        return values.mean()


@SCHEMES.register("forward")
class ForwardDifference:
    """``f(x + eps z) - f(x) = eps g.z + O(eps^2)``; one extra evaluation of ``f(x)`` shared by all directions."""

    offsets = (1.0,)
    needs_base = True

    def difference(self, values: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        return values[:, 0] - base

    def loss(self, values: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        return base


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
# Estimators: which directions a step probes and how their differences combine


@ESTIMATORS.register("spsa")
class SPSA:
    """n-SPSA: ``g ~ (1/n) sum_k (d_k / eps) z_k``; unbiased up to O(eps^2) since ``E[z z^T] = I``."""

    def __init__(self, directions: int = 1, distribution: str = "gaussian", coordinates: int | None = None):
        if not isinstance(directions, int) or directions < 1:
            raise ConfigError(f"optimizer.directions must be a positive integer, got {directions!r}")
        DISTRIBUTIONS.get(distribution)
        self.directions = directions
        self.distribution = distribution

    def sample(
        self, seed: int, tensors: Sequence[int], params: Sequence[torch.Tensor], generator: torch.Generator
    ) -> list[Direction]:
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
        if coordinates is not None and (not isinstance(coordinates, int) or coordinates < 1):
            raise ConfigError(f"optimizer.coordinates must be a positive integer or null (all), got {coordinates!r}")
        self.coordinates = coordinates

    def sample(
        self, seed: int, tensors: Sequence[int], params: Sequence[torch.Tensor], generator: torch.Generator
    ) -> list[Direction]:
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
# Evaluating the loss at perturbed parameters


@dataclass
class ParameterSet:
    """The optimizer's tensors in a fixed order, their names, and the module they belong to (if bound)."""

    tensors: list[torch.Tensor]
    names: list[str]
    module: nn.Module | None


class ReplayedClosure:
    """Calls ``closure`` with the RNG state it had when created: every evaluation of a step draws the same
    random numbers (dropout masks), so differences measure the parameters alone."""

    def __init__(self, closure: Closure, devices: Iterable[torch.device]):
        self.closure = closure
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = {d.index or 0: torch.cuda.get_rng_state(d) for d in set(devices) if d.type == "cuda"}
        self.calls = 0

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        for index, state in self.cuda_states.items():
            torch.cuda.set_rng_state(state, index)

    def __call__(self) -> torch.Tensor:
        self.restore()
        self.calls += 1
        return self.closure().detach()


def _scaled(eps: Sequence[float], factor: float, tensors: Iterable[int]) -> dict[int, float]:
    return {t: factor * eps[t] for t in tensors}


@EVALUATORS.register("sequential")
class SequentialEvaluator:
    """Perturb in place, evaluate, restore: ``+eps z``, ``-2 eps z``, ``+eps z`` for a central difference,
    exactly MeZO's walk. Memory: one tensor's direction at a time, no copy of the parameters."""

    def __init__(self, chunk_size: int = 16):
        self.chunk_size = chunk_size

    def __call__(
        self,
        params: ParameterSet,
        directions: Sequence[Direction],
        offsets: Sequence[float],
        eps: Sequence[float],
        loss_fn: ReplayedClosure,
    ) -> torch.Tensor:
        rows = []
        for direction in directions:
            position, row = 0.0, []
            for offset in offsets:
                direction.add_to(params.tensors, _scaled(eps, offset - position, direction.tensors))
                position = offset
                row.append(loss_fn())
            direction.add_to(params.tensors, _scaled(eps, -position, direction.tensors))
            rows.append(torch.stack(row))
        return torch.stack(rows)


class _ClosureModule(nn.Module):
    """Holds the model as a submodule so ``functional_call`` can swap its parameters around the closure."""

    def __init__(self, model: nn.Module, closure: Closure):
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self) -> torch.Tensor:
        return self.closure()


@EVALUATORS.register("vmap")
class VmapEvaluator:
    """Up to ``chunk_size`` perturbed parameter sets evaluated in one batched forward: ``functional_call``
    of the model under ``torch.func.vmap`` (randomness "same"). Trades memory (a stacked copy of every
    perturbed tensor per chunk) for fewer, larger kernels."""

    def __init__(self, chunk_size: int = 16):
        self.chunk_size = chunk_size

    def __call__(
        self,
        params: ParameterSet,
        directions: Sequence[Direction],
        offsets: Sequence[float],
        eps: Sequence[float],
        loss_fn: ReplayedClosure,
    ) -> torch.Tensor:
        if params.module is None:
            raise RuntimeError("optimizer.parallel=vmap needs the model: call optimizer.bind(model) first")
        wrapper = _ClosureModule(params.module, loss_fn.closure)
        points = [(direction, offset) for direction in directions for offset in offsets]
        chunks = [points[i : i + self.chunk_size] for i in range(0, len(points), self.chunk_size)]
        values = torch.cat([self._chunk(wrapper, params, chunk, eps, loss_fn) for chunk in chunks])
        return values.view(len(directions), len(offsets))

    @staticmethod
    def _chunk(
        wrapper: _ClosureModule,
        params: ParameterSet,
        points: Sequence[tuple[Direction, float]],
        eps: Sequence[float],
        loss_fn: ReplayedClosure,
    ) -> torch.Tensor:
        touched = sorted({t for direction, _ in points for t in direction.tensors})
        stacked = {f"model.{params.names[t]}": _stack(params.tensors[t], t, points, eps[t]) for t in touched}
        loss_fn.restore()
        loss_fn.calls += len(points)
        values = vmap(partial(functional_call, wrapper, args=()), randomness="same")(stacked)
        return values.detach()


def _stack(param: torch.Tensor, t: int, points: Sequence[tuple[Direction, float]], eps: float) -> torch.Tensor:
    """``param + offset * eps * z_t`` for every point (``param`` itself where a point leaves ``t`` alone)."""
    return torch.stack(
        [param + offset * eps * d.component(t, param) if t in d.tensors else param for d, offset in points]
    )


# ---------------------------------------------------------------------------------------------------
# Estimates, momentum, line search, sensitivity, hybrid schedule


@dataclass
class Estimate:
    """One step's estimate ``g_hat_t = sum_k coefficients[k] / eps[t] * z_(k,t)``."""

    directions: list[Direction]
    coefficients: torch.Tensor
    eps: list[float]

    def components(self, weight: float = 1.0) -> list[tuple[Direction, dict[int, float]]]:
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


Components = list[tuple[Direction, dict[int, float]]]


@MOMENTUM.register("none")
class NoMomentum:
    def __init__(self, beta: float = 0.0, history: int = 1):
        pass

    def components(self, estimate: Estimate, optimizer: ZerothOrderOptimizer) -> Components:
        return estimate.components()


@MOMENTUM.register("seeds")
class SeedMomentum:
    """EMA over the last ``history`` estimates, replayed from their seeds: ``(1 - b) sum_j b^j g_(k-j)``.
    Costs ``history`` regenerations per update, no buffer (MeZO's memory)."""

    def __init__(self, beta: float = 0.9, history: int = 8):
        self.beta = beta
        self.history = history

    def components(self, estimate: Estimate, optimizer: ZerothOrderOptimizer) -> Components:
        state = optimizer.zeroth_order_state
        state["history"] = [estimate.encode(), *state.get("history", [])][: self.history]
        past = [Estimate.decode(data) for data in state["history"]]
        return [c for j, e in enumerate(past) for c in e.components((1 - self.beta) * self.beta**j)]


@MOMENTUM.register("buffer")
class BufferMomentum:
    """Exact EMA ``m = b m + (1 - b) g_hat`` in a dense buffer per tensor (a gradient-sized allocation)."""

    def __init__(self, beta: float = 0.9, history: int = 1):
        self.beta = beta

    def components(self, estimate: Estimate, optimizer: ZerothOrderOptimizer) -> Components:
        tensors = optimizer.parameter_set().tensors
        buffers = [optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in tensors]
        for buffer in buffers:
            buffer.mul_(self.beta)
        for direction, scales in estimate.components(1 - self.beta):
            direction.add_to(buffers, scales)
        return [(DenseDirection(dict(enumerate(buffers))), dict.fromkeys(range(len(buffers)), 1.0))]


@dataclass
class LineSearch:
    """Backtracking along the estimated direction on the step's batch: try the full step, shrink it by
    ``shrink`` up to ``max_steps`` times until ``f(x - a lr g_hat) <= f(x) - c a lr (g . g_hat)``; if no
    trial passes, take no step. ``f(x)`` is the scheme's estimate (for central: the mean of ``f(x +- eps z)``)."""

    enabled: bool = False
    shrink: float = 0.5
    max_steps: int = 3
    c: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.shrink < 1:
            raise ConfigError(f"optimizer.line_search.shrink must be in (0, 1), got {self.shrink}")
        if self.max_steps < 0 or self.c < 0:
            raise ConfigError("optimizer.line_search.max_steps and .c must be >= 0")

    def run(self, move: Callable[[float], None], loss_fn: Closure, base: float, decrease: float) -> float:
        """``move(delta)`` shifts the step factor by ``delta``; returns the accepted factor (0: no step)."""
        factor = 1.0
        move(factor)
        for trial in range(self.max_steps + 1):
            if float(loss_fn()) <= base - self.c * factor * decrease:
                return factor
            target = factor * self.shrink if trial < self.max_steps else 0.0
            move(target - factor)
            factor = target
        return factor


@dataclass
class Sensitivity:
    """Per-tensor sensitivity ``||dL/dtheta_t||``: every ``every`` steps each tensor is probed alone with a
    central SPSA difference ``p_t ~ g_t . z_t`` (``E[p_t^2] = ||g_t||^2``); the score is ``sqrt(EMA(p_t^2))``.
    Costs two evaluations per tensor per probe; ``every: 0`` disables it."""

    every: int = 0
    ema: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 0:
            raise ConfigError(f"optimizer.sensitivity.every must be an integer >= 0, got {self.every!r}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"optimizer.sensitivity.ema must be in [0, 1), got {self.ema}")

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


@dataclass
class HybridSchedule:
    """``first`` until ``switch_step`` (global step), then the other phase; ``switch_step: null``: only
    finite differences. ``backprop``: factory of the first-order optimizer (called with parameter groups)."""

    switch_step: int | None = None
    first: str = "finite_difference"
    backprop: Callable[..., torch.optim.Optimizer] | None = None

    def __post_init__(self) -> None:
        if self.first not in PHASES:
            raise ConfigError(f"optimizer.hybrid.first='{self.first}' is unknown; choose one of: {', '.join(PHASES)}")
        if self.switch_step is None and self.first != "finite_difference":
            raise ConfigError("optimizer.hybrid.first=backprop needs optimizer.hybrid.switch_step (an integer)")
        if self.switch_step is not None and (self.backprop is None or self.switch_step < 0):
            raise ConfigError("optimizer.hybrid.switch_step needs switch_step >= 0 and a hybrid.backprop optimizer")

    @property
    def uses_backprop(self) -> bool:
        return self.switch_step is not None

    def phase_at(self, step: int) -> str:
        second = PHASES[1 - PHASES.index(self.first)]
        return (self.first, second)[int(self.switch_step is not None and step >= self.switch_step)]


# ---------------------------------------------------------------------------------------------------
# The optimizer


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Finite-difference optimizer (see the module docstring for every option).

    ``step(closure)``: ``closure()`` returns the loss on one fixed batch at the current parameters; the step
    estimates the gradient from loss differences and applies ``theta -= lr * (g_hat + weight_decay * theta)``
    (decoupled decay, per parameter group). It can also be split: ``estimate(closure)`` then ``step()``
    (what the Lightning glue does, so Lightning's own closure runs once per step). ``stats`` holds the
    last step's figures for logging.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        estimator: str = "spsa",
        directions: int = 1,
        distribution: str = "gaussian",
        coordinates: int | None = None,
        scheme: str = "central",
        eps: float = 1e-3,
        epsilon: str = "fixed",
        epsilon_range: Sequence[float] = (0.1, 10.0),
        tensors: str = "all",
        tensor_fraction: float = 1.0,
        parallel: str = "sequential",
        chunk_size: int = 16,
        momentum: float = 0.0,
        momentum_mode: str = "seeds",
        history: int = 8,
        line_search: Mapping[str, Any] | None = None,
        sensitivity: Mapping[str, Any] | None = None,
        seed: int | None = None,
        hybrid: Mapping[str, Any] | None = None,
    ):
        groups = list(params)
        # the per-group options as the caller gave them (torch fills in the defaults), for the hybrid's backprop
        self.group_options = [_options(g) for g in groups] if groups and isinstance(groups[0], Mapping) else [{}]
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        _validate(eps, epsilon_range, tensor_fraction, chunk_size, momentum, history)
        self.estimator = ESTIMATORS.build(estimator, directions, distribution, coordinates)
        self.scheme = SCHEMES.build(scheme)
        self.epsilon_mode = EPSILONS.get(epsilon)
        self.sample_tensors = TENSOR_SAMPLERS.get(tensors)
        self.evaluate = EVALUATORS.build(parallel, chunk_size)
        MOMENTUM.get(momentum_mode)
        self.momentum = MOMENTUM.build(momentum_mode if momentum > 0 else "none", momentum, history)
        self.line_search = LineSearch(**dict(line_search or {}))
        self.sensitivity = Sensitivity(**dict(sensitivity or {}))
        self.hybrid = HybridSchedule(**dict(hybrid or {}))
        if "sensitivity" in (epsilon, tensors) and self.sensitivity.every == 0:
            raise ConfigError("optimizer.epsilon/tensors=sensitivity need optimizer.sensitivity.every > 0")
        self.eps = float(eps)
        self.epsilon_range = (float(epsilon_range[0]), float(epsilon_range[1]))
        self.tensor_fraction = float(tensor_fraction)
        seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.state[STATE_KEY] = {"seed": seed, "step": 0}
        self._names: list[str] | None = None
        self._module: nn.Module | None = None
        self._pending: tuple[Estimate, ReplayedClosure, torch.Tensor, torch.Tensor] | None = None
        self.stats: dict[str, Any] = {}

    # -- parameters --------------------------------------------------------------------------------

    @property
    def zeroth_order_state(self) -> dict[str, Any]:
        """Step counter, seed, momentum history and sensitivity statistics (checkpointed with the optimizer)."""
        return self.state[STATE_KEY]

    def bind(self, module: nn.Module) -> ZerothOrderOptimizer:
        """Name the tensors after ``module``'s parameters (for logs) and allow ``parallel=vmap``."""
        names = {id(p): name for name, p in module.named_parameters()}
        tensors = self._tensors()
        missing = [i for i, p in enumerate(tensors) if id(p) not in names]
        if missing:
            raise ValueError(f"optimizer.bind: {len(missing)} optimized tensors are not parameters of the module")
        self._names = [names[id(p)] for p in tensors]
        self._module = module
        return self

    def parameter_set(self) -> ParameterSet:
        tensors = self._tensors()
        names = self._names or [f"param{i}" for i in range(len(tensors))]
        return ParameterSet(tensors, names, self._module)

    def backprop_groups(self) -> list[dict[str, Any]]:
        """The parameter groups with the caller's own per-group options (e.g. ``weight_decay: 0``)."""
        return [{"params": g["params"], **o} for g, o in zip(self.param_groups, self.group_options, strict=True)]

    def _tensors(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _per_tensor(self, key: str) -> list[float]:
        return [float(group[key]) for group in self.param_groups for _ in group["params"]]

    def sensitivity_scores(self) -> dict[str, float]:
        """``{tensor name: score}`` (empty before the first probe)."""
        mean_square = self.zeroth_order_state.get("sensitivity")
        if mean_square is None:
            return {}
        return dict(zip(self.parameter_set().names, mean_square.sqrt().tolist(), strict=True))

    # -- estimate ----------------------------------------------------------------------------------

    @torch.no_grad()
    def estimate(self, closure: Closure) -> torch.Tensor:
        """Evaluate ``closure`` at perturbed parameters (restored afterwards) and keep the estimate for the
        next ``step()``. Returns the estimated loss at the current parameters."""
        params = self.parameter_set()
        state = self.zeroth_order_state
        seed = mix_seed(state["seed"], state["step"])
        loss_fn = ReplayedClosure(closure, (p.device for p in params.tensors))
        probed = self._probe(params, loss_fn, seed)
        eps = self._epsilons(params)
        generator = seeded_generator(mix_seed(seed, _SAMPLING_KEY))
        chosen = self.sample_tensors(len(params.tensors), self.tensor_fraction, self._scores(), generator)
        directions = self.estimator.sample(seed, chosen, params.tensors, generator)
        values = self.evaluate(params, directions, self.scheme.offsets, eps, loss_fn)
        base = loss_fn() if self.scheme.needs_base else None
        differences = self.scheme.difference(values, base)
        coefficients = differences / self.estimator.normalizer(len(directions))
        loss = self.scheme.loss(values, base)
        projected = differences.double() / self.eps
        self._pending = (Estimate(directions, coefficients, eps), loss_fn, loss, projected)
        self.stats = {
            "loss": loss,
            "projected_grad": projected.mean(),
            "epsilon": sum(eps[t] for t in chosen) / len(chosen),
            "tensors": len(chosen),
            "evaluations": loss_fn.calls,
            "sensitivity": self.sensitivity_scores() if probed else {},
        }
        return loss

    def _scores(self) -> torch.Tensor | None:
        mean_square = self.zeroth_order_state.get("sensitivity")
        return None if mean_square is None else mean_square.sqrt()

    def _epsilons(self, params: ParameterSet) -> list[float]:
        return self.epsilon_mode(params.tensors, self.eps, self.epsilon_range, self._scores())

    def _probe(self, params: ParameterSet, loss_fn: ReplayedClosure, seed: int) -> bool:
        if not self.sensitivity.due(self.zeroth_order_state["step"]):
            return False
        eps = self._epsilons(params)
        self.sensitivity.probe(params, self.evaluate, loss_fn, eps, self.zeroth_order_state, mix_seed(seed, _PROBE_KEY))
        return True

    # -- step --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """Apply the pending estimate, or estimate with ``closure`` first when none is pending. With an
        estimate pending, a given ``closure`` is called once and ignored (Lightning's hook closure)."""
        if self._pending is None:
            if closure is None:
                raise RuntimeError("ZerothOrderOptimizer.step needs a closure (the loss on a fixed batch)")
            self.estimate(closure)
        elif closure is not None:
            closure()
        (estimate, loss_fn, loss, projected), self._pending = self._pending, None
        tensors = self.parameter_set().tensors
        lrs = self._per_tensor("lr")
        move = partial(_move, tensors, self.momentum.components(estimate, self), lrs)
        factor = self._take_step(move, loss_fn, loss, projected, lrs)
        for p, lr, decay in zip(tensors, lrs, self._per_tensor("weight_decay"), strict=True):
            p.mul_(1 - lr * decay)
        self.zeroth_order_state["step"] += 1
        self.stats.update(step_size=factor * lrs[0] if lrs else 0.0, evaluations=loss_fn.calls)
        return loss

    def _take_step(
        self,
        move: Callable[[float], None],
        loss_fn: ReplayedClosure,
        loss: torch.Tensor,
        projected: torch.Tensor,
        lrs: Sequence[float],
    ) -> float:
        if not self.line_search.enabled:
            move(1.0)
            return 1.0
        decrease = float(self.estimator.decrease_rate(projected)) * (lrs[0] if lrs else 0.0)
        return self.line_search.run(move, loss_fn, float(loss), decrease)


def _move(tensors: Sequence[torch.Tensor], components: Components, lrs: Sequence[float], factor: float) -> None:
    """``theta_t -= factor * lr_t * sum(components)``: regenerates each direction, one tensor at a time."""
    for direction, scales in components:
        direction.add_to(tensors, {t: -factor * lrs[t] * s for t, s in scales.items()})


def _options(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _validate(
    eps: float,
    epsilon_range: Sequence[float],
    tensor_fraction: float,
    chunk_size: int,
    momentum: float,
    history: int,
) -> None:
    checks = {
        "eps must be a positive finite number": eps > 0 and math.isfinite(eps),
        "epsilon_range must be [low, high] with 0 < low <= 1 <= high": len(epsilon_range) == 2
        and 0 < epsilon_range[0] <= 1 <= epsilon_range[1],
        "tensor_fraction must be in (0, 1]": 0 < tensor_fraction <= 1,
        "chunk_size must be a positive integer": isinstance(chunk_size, int) and chunk_size >= 1,
        "momentum must be in [0, 1)": 0 <= momentum < 1,
        "history must be a positive integer": isinstance(history, int) and history >= 1,
    }
    for message, ok in checks.items():
        if not ok:
            raise ConfigError(f"optimizer.{message}")
