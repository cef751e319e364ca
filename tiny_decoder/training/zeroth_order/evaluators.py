"""Evaluating the loss at perturbed parameters.

- :class:`ParameterSet`: the optimizer's tensors in a fixed order, their names and their module.
- :class:`ReplayedClosure`: the step's loss closure, called with the same RNG state every time (each forward
  of a step sees the same batch and the same dropout masks).
- ``scheme`` (:data:`SCHEMES`): ``central`` ``(f(x + eps z) - f(x - eps z)) / 2`` (error O(eps^2), 2
  evaluations a direction) or ``forward`` ``f(x + eps z) - f(x)`` (error O(eps), 1 evaluation a direction + 1
  shared): the offsets evaluated and how their values combine.
- ``parallel`` (:data:`EVALUATORS`): ``sequential`` (perturb in place and restore: MeZO's memory) or ``vmap``
  (the perturbations of a chunk evaluated in one batched forward with ``torch.func.functional_call`` under
  ``vmap``; costs a stacked copy of the perturbed tensors per chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, vmap

from tiny_decoder.core.registry import Registry
from tiny_decoder.training.zeroth_order.directions import Direction

Closure = Callable[[], torch.Tensor]
Point = tuple[Direction, float]  # the parameters ``theta + offset * eps * z`` of one evaluation

SCHEMES = Registry("optimizer.scheme", group="optimizer.scheme")
EVALUATORS = Registry("optimizer.parallel", group="optimizer.parallel")


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
        return values[:, 0] - _required(base)

    def loss(self, values: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        return _required(base)


def _required(base: torch.Tensor | None) -> torch.Tensor:
    """``f(x)``, which a scheme with ``needs_base`` is always given."""
    assert base is not None, "forward differences need f(x) (needs_base)"
    return base


# ---------------------------------------------------------------------------------------------------
# Evaluators


class Evaluator:
    """``evaluator(params, directions, offsets, eps, loss_fn)``: the loss at ``theta_t + offset * eps[t] * z_t``
    for every direction ``z`` and offset, a ``(len(directions), len(offsets))`` tensor; the parameters are left
    as they were. Subclasses evaluate the flat list of points (direction-major) in :meth:`values`."""

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
        points = [(direction, offset) for direction in directions for offset in offsets]
        return self.values(params, points, eps, loss_fn).view(len(directions), len(offsets))

    def values(
        self, params: ParameterSet, points: Sequence[Point], eps: Sequence[float], loss_fn: ReplayedClosure
    ) -> torch.Tensor:
        """The loss at each point, a 1-D tensor."""
        raise NotImplementedError


def _scaled(eps: Sequence[float], factor: float, tensors: Iterable[int]) -> dict[int, float]:
    return {t: factor * eps[t] for t in tensors}


@EVALUATORS.register("sequential")
class SequentialEvaluator(Evaluator):
    """Perturb in place, evaluate, restore: ``+eps z``, ``-2 eps z``, ``+eps z`` for a central difference,
    exactly MeZO's walk. Memory: one tensor's direction at a time, no copy of the parameters."""

    def values(
        self, params: ParameterSet, points: Sequence[Point], eps: Sequence[float], loss_fn: ReplayedClosure
    ) -> torch.Tensor:
        values = []
        walked: Direction | None = None  # the direction the parameters are moved along, ``position`` eps away
        position = 0.0
        for direction, offset in points:
            if direction is not walked:
                self._restore(params, walked, position, eps)
                walked, position = direction, 0.0
            direction.add_to(params.tensors, _scaled(eps, offset - position, direction.tensors))
            position = offset
            values.append(loss_fn())
        self._restore(params, walked, position, eps)
        return torch.stack(values)

    @staticmethod
    def _restore(params: ParameterSet, direction: Direction | None, position: float, eps: Sequence[float]) -> None:
        if direction is not None:
            direction.add_to(params.tensors, _scaled(eps, -position, direction.tensors))


class _ClosureModule(nn.Module):
    """Holds the model as a submodule so ``functional_call`` can swap its parameters around the closure."""

    def __init__(self, model: nn.Module, closure: Closure):
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self) -> torch.Tensor:
        return self.closure()


@EVALUATORS.register("vmap")
class VmapEvaluator(Evaluator):
    """Up to ``chunk_size`` perturbed parameter sets evaluated in one batched forward: ``functional_call``
    of the model under ``torch.func.vmap`` (randomness "same"). Trades memory (a stacked copy of every
    perturbed tensor per chunk) for fewer, larger kernels."""

    def values(
        self, params: ParameterSet, points: Sequence[Point], eps: Sequence[float], loss_fn: ReplayedClosure
    ) -> torch.Tensor:
        if params.module is None:
            raise RuntimeError("optimizer.parallel=vmap needs the model: call optimizer.bind(model) first")
        wrapper = _ClosureModule(params.module, loss_fn.closure)
        chunks = [points[i : i + self.chunk_size] for i in range(0, len(points), self.chunk_size)]
        return torch.cat([self._chunk(wrapper, params, chunk, eps, loss_fn) for chunk in chunks])

    @staticmethod
    def _chunk(
        wrapper: _ClosureModule,
        params: ParameterSet,
        points: Sequence[Point],
        eps: Sequence[float],
        loss_fn: ReplayedClosure,
    ) -> torch.Tensor:
        touched = sorted({t for direction, _ in points for t in direction.tensors})
        stacked = {f"model.{params.names[t]}": _stack(params.tensors[t], t, points, eps[t]) for t in touched}
        loss_fn.restore()
        loss_fn.calls += len(points)
        values = vmap(partial(functional_call, wrapper, args=()), randomness="same")(stacked)
        return values.detach()


def _stack(param: torch.Tensor, t: int, points: Sequence[Point], eps: float) -> torch.Tensor:
    """``param + offset * eps * z_t`` for every point (``param`` itself where a point leaves ``t`` alone)."""
    return torch.stack(
        [param + offset * eps * d.component(t, param) if t in d.tensors else param for d, offset in points]
    )
