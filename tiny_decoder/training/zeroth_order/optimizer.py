""":class:`ZerothOrderOptimizer`: the ``torch.optim.Optimizer`` of zeroth-order training, with its state,
momentum, line search and hybrid schedule options.

``step(closure)`` evaluates ``closure()`` -- the loss of the model on one fixed batch -- at perturbed
parameters and applies the estimated update (see the package docstring). The options it combines:

- ``estimator`` / ``distribution`` (``directions.py``), ``scheme`` / ``parallel`` (``evaluators.py``),
  ``epsilon`` / ``tensors`` / ``sensitivity`` (``per_tensor.py``).
- ``momentum_mode`` (with ``momentum > 0``): ``seeds`` replays the last ``history`` estimates from their seeds
  (no buffer; the truncated EMA ``(1 - b) sum_j b^j g_(k-j)``) or ``buffer`` (a dense EMA buffer per tensor:
  exact, but a full gradient-sized buffer).
- ``line_search`` (:class:`LineSearch`) backtracks the step along the estimated direction on the same batch.
- ``hybrid`` (:class:`HybridSchedule`): when to switch between finite differences and backprop; ``hybrid.py``
  runs the switch under Lightning.

The state (step counter, seed, momentum history, sensitivity statistics) is ``optimizer.state[STATE_KEY]``,
so it is checkpointed (and loaded ``weights_only``) with the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from tiny_decoder.core.checks import check, check_int, check_number, is_count, is_positive, is_positive_int
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.core.registry import Registry
from tiny_decoder.core.seeds import mix_seed, seeded_generator
from tiny_decoder.training.zeroth_order.directions import ESTIMATORS, Components, DenseDirection, Estimate
from tiny_decoder.training.zeroth_order.evaluators import EVALUATORS, SCHEMES, Closure, ParameterSet, ReplayedClosure
from tiny_decoder.training.zeroth_order.per_tensor import EPSILONS, TENSOR_SAMPLERS, Sensitivity

MOMENTUM = Registry("optimizer.momentum_mode", group="optimizer.momentum_mode")

PHASES = ("finite_difference", "backprop")  # the hybrid schedule's phases, run by the Lightning glue
STATE_KEY = "zeroth_order"  # this optimizer's own entry in ``optimizer.state`` (saved with checkpoints)
_SAMPLING_KEY = 0x5A4D  # seed-stream labels, so the sampling and direction streams never coincide
_PROBE_KEY = 0x5E25


# ---------------------------------------------------------------------------------------------------
# Momentum, line search, hybrid schedule


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
        check_number("optimizer.line_search.shrink", self.shrink, 0, 1, low_open=True, high_open=True)
        check_int("optimizer.line_search.max_steps", self.max_steps, 0)
        check_number("optimizer.line_search.c", self.c, 0)

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
class HybridSchedule:
    """``first`` until ``switch_step`` (global step), then the other phase; ``switch_step: null``: only
    finite differences. ``backprop``: factory of the first-order optimizer (called with parameter groups)."""

    switch_step: int | None = None
    first: str = "finite_difference"
    backprop: Callable[..., torch.optim.Optimizer] | None = None

    def __post_init__(self) -> None:
        check("optimizer.hybrid.first", self.first, PHASES.__contains__, f"one of: {', '.join(PHASES)}")
        check("optimizer.hybrid.switch_step", self.switch_step, _is_step_or_none, "an integer >= 0 or null")
        if self.switch_step is None and self.first != "finite_difference":
            raise ConfigError("optimizer.hybrid.first=backprop needs optimizer.hybrid.switch_step (an integer)")
        if self.switch_step is not None and self.backprop is None:
            raise ConfigError("optimizer.hybrid.switch_step needs a hybrid.backprop optimizer")

    @property
    def uses_backprop(self) -> bool:
        return self.switch_step is not None

    def phase_at(self, step: int) -> str:
        second = PHASES[1 - PHASES.index(self.first)]
        return (self.first, second)[int(self.switch_step is not None and step >= self.switch_step)]


# ---------------------------------------------------------------------------------------------------
# The optimizer


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Finite-difference optimizer (see the package docstring for every option).

    ``step(closure)``: ``closure()`` returns the loss on one fixed batch at the current parameters; the step
    estimates the gradient from loss differences and applies ``theta -= lr * (g_hat + weight_decay * theta)``
    (decoupled decay, per parameter group). It can also be split: ``estimate(closure)`` then ``step()``
    (what the Lightning glue does, so Lightning's own closure runs once per step). ``stats`` holds the
    last step's figures for logging; between ``estimate`` and ``step``, :attr:`pending_estimate` and
    :attr:`projected_gradients` show the estimate the step will apply.
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
        groups: list[Any] = list(params)  # tensors or group dicts, as torch.optim.Optimizer takes them
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
        self._keyed_state[STATE_KEY] = {"seed": seed, "step": 0}
        self._names: list[str] | None = None
        self._module: nn.Module | None = None
        self._pending: tuple[Estimate, ReplayedClosure, torch.Tensor, torch.Tensor] | None = None
        self.stats: dict[str, Any] = {}

    # -- parameters --------------------------------------------------------------------------------

    @property
    def zeroth_order_state(self) -> dict[str, Any]:
        """Step counter, seed, momentum history and sensitivity statistics (checkpointed with the optimizer)."""
        return self._keyed_state[STATE_KEY]

    @property
    def _keyed_state(self) -> dict[Any, Any]:
        """``self.state``, typed with any keys: torch types them as parameters, but its ``state_dict`` keeps other
        keys as they are (this optimizer's own entry is :data:`STATE_KEY`)."""
        return self.state

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

    @property
    def pending_estimate(self) -> Estimate | None:
        """The estimate the last :meth:`estimate` computed and the next :meth:`step` applies (its directions,
        coefficients and per-tensor epsilons); ``None`` when none is pending (before the first estimate, or
        once a step has applied it)."""
        return None if self._pending is None else self._pending[0]

    @property
    def projected_gradients(self) -> torch.Tensor | None:
        """Per direction of :attr:`pending_estimate`, the projected gradient (the scheme's loss difference over
        ``eps``, float64: the directional derivative along that direction); ``stats["projected_grad"]`` is their
        mean. ``None`` when no estimate is pending."""
        return None if self._pending is None else self._pending[3]

    def epsilons(self, params: ParameterSet | None = None) -> list[float]:
        """The perturbation size per tensor of ``params`` (default: :meth:`parameter_set`) that the next
        estimate uses: ``eps`` as the ``epsilon`` mode sets it per tensor (``fixed``, ``relative`` to the
        tensor's RMS, or following the ``sensitivity`` scores; adaptive ratios clamped to ``epsilon_range``)."""
        params = self.parameter_set() if params is None else params
        return self.epsilon_mode(params.tensors, self.eps, self.epsilon_range, self._scores())

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
        eps = self.epsilons(params)
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

    def _probe(self, params: ParameterSet, loss_fn: ReplayedClosure, seed: int) -> bool:
        if not self.sensitivity.due(self.zeroth_order_state["step"]):
            return False
        eps = self.epsilons(params)
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
        pending, self._pending = self._pending, None
        assert pending is not None  # set by estimate()
        estimate, loss_fn, loss, projected = pending
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


def _is_step_or_none(value: Any) -> bool:
    return value is None or is_count(value)


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
    check("optimizer.eps", eps, is_positive, "a positive finite number")
    check(
        "optimizer.epsilon_range",
        epsilon_range,
        lambda r: len(r) == 2 and 0 < r[0] <= 1 <= r[1],
        "[low, high] with 0 < low <= 1 <= high",
    )
    check_number("optimizer.tensor_fraction", tensor_fraction, 0, 1, low_open=True)
    check("optimizer.chunk_size", chunk_size, is_positive_int, "a positive integer")
    check_number("optimizer.momentum", momentum, 0, 1, high_open=True)
    check("optimizer.history", history, is_positive_int, "a positive integer")
