"""The integer-sequence families for next-number prediction: 19 recurrence rules in three curriculum phases.

Contents
- `Family` and the registry `FAMILIES` (name -> Family, ordered): 19 generators grouped into the three
  curriculum phases of the design card. `FAMILY_NAMES[i]` is the family with integer id ``i`` in batches;
  `FAMILY_IDS_BY_PHASE[phase]` are the ids of one phase.
- The drawing helpers and the generators of each phase (drawing batches from them is `data/sequences.py`).

Value range and mappings
Every value lies in [0, 255] (one class per value, vocabulary 256). Parameters are drawn at random and a
draw is rejected and redrawn (at most `MAX_DRAWS` times, then RuntimeError) when a term leaves the range.
Four families use a documented mapping into the range:
- `geometric`, `alternating_factors`: with integer ratios >= 2 nine exact terms cannot fit in [0, 255]
  (2**8 = 256), so their products are reduced modulo 256 (arithmetic in Z/256, the value vocabulary):
  ``x_{i+1} = (r * x_i) % 256``. The sequence is exact while it fits and wraps afterwards.
- `rational_factors`: the factors 1/2 and 3/2 are applied with floor: ``x // 2`` and ``(3 * x) // 2``.
- `alternating_signs`: a signed value v in [-128, 127] is encoded as ``v + 128``.

The families are tuned for the default window of 9 terms (8 inputs + 1 next number); every family can fill
windows up to ``MAX_SEQ_LEN`` within [0, 255].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MIN_VALUE = 0
MAX_VALUE = 255
MODULUS = MAX_VALUE + 1
SIGNED_OFFSET = 128
MAX_DRAWS = 1000
MAX_SEQ_LEN = 15
PHASES = (1, 2, 3)

Sampler = Callable[[np.random.Generator, int], list[int]]
Draw = Callable[[np.random.Generator, int], list[int] | None]  # None: parameters rejected, draw again


@dataclass(frozen=True)
class Family:
    """A sequence generator: `sample(rng, n)` returns n integers in [0, 255] that obey `rule`."""

    name: str
    phase: int
    sample: Sampler
    rule: str


# --------------------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------------------


def _uniform(rng: np.random.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high] (both inclusive)."""
    return int(rng.integers(low, high + 1))


def _nonzero(rng: np.random.Generator, bound: int) -> int:
    """A uniform integer in [-bound, bound] without 0."""
    magnitude = _uniform(rng, 1, bound)
    return magnitude if rng.random() < 0.5 else -magnitude


def _step_bound(n: int, cap: int, span: int = MAX_VALUE) -> int:
    """Largest step size (at most `cap`) whose n - 1 steps still fit in `span`."""
    return max(1, min(cap, span // max(1, n - 1)))


def _cumulative(steps: Sequence[int]) -> list[int]:
    """Offsets 0, s0, s0 + s1, ... (one more term than steps)."""
    offsets = [0]
    for step in steps:
        offsets.append(offsets[-1] + step)
    return offsets


def _place(
    rng: np.random.Generator, offsets: Sequence[int], low: int = MIN_VALUE, high: int = MAX_VALUE
) -> list[int] | None:
    """Shift a shape by a uniformly random start so it lies in [low, high]; None when it is too wide."""
    lowest, highest = min(offsets), max(offsets)
    if highest - lowest > high - low:
        return None
    start = _uniform(rng, low - lowest, high - highest)
    return [start + offset for offset in offsets]


def _in_range(values: Sequence[int]) -> bool:
    return all(MIN_VALUE <= value <= MAX_VALUE for value in values)


def _redrawn_until_in_range(name: str, draw: Draw) -> Sampler:
    """Wrap `draw` (which may return None for rejected parameters) so it is redrawn until every term fits."""

    def sample(rng: np.random.Generator, n: int) -> list[int]:
        for _ in range(MAX_DRAWS):
            values = draw(rng, n)
            if values is not None and _in_range(values):
                return values
        raise RuntimeError(
            f"family {name!r} could not draw {n} terms within [{MIN_VALUE}, {MAX_VALUE}] in {MAX_DRAWS} "
            f"tries; use a shorter window (seq_len <= {MAX_SEQ_LEN})"
        )

    return sample


# --------------------------------------------------------------------------------------------------------
# Phase 1: simple recurrences
# --------------------------------------------------------------------------------------------------------


def _constant(rng: np.random.Generator, n: int) -> list[int]:
    return [_uniform(rng, MIN_VALUE, MAX_VALUE)] * n


def _arithmetic(rng: np.random.Generator, n: int) -> list[int] | None:
    step = _nonzero(rng, _step_bound(n, cap=MAX_VALUE))
    return _place(rng, [i * step for i in range(n)])


def _alternating(rng: np.random.Generator, n: int) -> list[int]:
    first = _uniform(rng, MIN_VALUE, MAX_VALUE)
    second = _uniform(rng, MIN_VALUE, MAX_VALUE - 1)
    if second >= first:  # skip `first`, so the two values differ
        second += 1
    return [first if i % 2 == 0 else second for i in range(n)]


# --------------------------------------------------------------------------------------------------------
# Phase 2: nested recurrences (the constants follow a recurrence themselves)
# --------------------------------------------------------------------------------------------------------


def _alternating_steps(rng: np.random.Generator, n: int) -> list[int] | None:
    bound = _step_bound(n, cap=20)
    first, second = _nonzero(rng, bound), _nonzero(rng, bound)
    if first == second:
        return None
    return _place(rng, _cumulative([first if i % 2 == 0 else second for i in range(n - 1)]))


def _growing_steps(rng: np.random.Generator, n: int) -> list[int] | None:
    step, growth = _uniform(rng, -5, 10), _uniform(rng, 1, 5)
    return _place(rng, _cumulative([step + i * growth for i in range(n - 1)]))


def _shrinking_steps(rng: np.random.Generator, n: int) -> list[int] | None:
    step, shrink = _uniform(rng, 1, 25), _uniform(rng, 1, 5)
    return _place(rng, _cumulative([step - i * shrink for i in range(n - 1)]))


def _products_mod(start: int, factors: Sequence[int]) -> list[int]:
    """start, start * f0, start * f0 * f1, ... each reduced modulo 256."""
    values = [start]
    for factor in factors:
        values.append(values[-1] * factor % MODULUS)
    return values


def _odd_start(rng: np.random.Generator) -> int:
    """An odd start in 1..63: small enough to show growth before wrapping, odd so that doubling
    reaches 0 (mod 256) only after 8 steps instead of collapsing into a tail of zeros."""
    return 2 * _uniform(rng, 0, 31) + 1


def _geometric(rng: np.random.Generator, n: int) -> list[int]:
    ratio = _uniform(rng, 2, 3)
    return _products_mod(_odd_start(rng), [ratio] * (n - 1))


def _alternating_factors(rng: np.random.Generator, n: int) -> list[int]:
    factors = (2, 3) if rng.random() < 0.5 else (3, 2)
    return _products_mod(_odd_start(rng), [factors[i % 2] for i in range(n - 1)])


def _halve(value: int) -> int:
    return value // 2


def _three_halves(value: int) -> int:
    return 3 * value // 2


def _rational_factors(rng: np.random.Generator, n: int) -> list[int] | None:
    operations = (_halve, _three_halves) if rng.random() < 0.5 else (_three_halves, _halve)
    values = [_uniform(rng, 32, MAX_VALUE)]
    for i in range(n - 1):
        values.append(operations[i % 2](values[-1]))
    return None if 0 in values else values  # 0 is absorbing: reject collapsed sequences


def _two_step(rng: np.random.Generator, n: int) -> list[int] | None:
    step = _nonzero(rng, _step_bound((n + 1) // 2, cap=40))
    return _place(rng, [(i // 2) * step for i in range(n)])


def _three_step(rng: np.random.Generator, n: int) -> list[int] | None:
    step = _nonzero(rng, _step_bound((n + 2) // 3, cap=60))
    return _place(rng, [(i // 3) * step for i in range(n)])


def _mixed_periods(rng: np.random.Generator, n: int) -> list[int] | None:
    step = _nonzero(rng, _step_bound(n, cap=40))
    return _place(rng, _cumulative([0 if i % 3 == 1 else step for i in range(n - 1)]))


# --------------------------------------------------------------------------------------------------------
# Phase 3: combined, transformed and conditional relations
# --------------------------------------------------------------------------------------------------------


def _fibonacci_mod(rng: np.random.Generator, n: int) -> list[int] | None:
    modulus = _uniform(rng, 2, 10)
    values = [_uniform(rng, 0, modulus - 1), _uniform(rng, 0, modulus - 1)]
    if values == [0, 0]:
        return None  # the all-zero sequence is the constant family
    while len(values) < n:
        values.append((values[-1] + values[-2]) % modulus)
    return values[:n]


def _double_every_third(rng: np.random.Generator, n: int) -> list[int] | None:
    step = _nonzero(rng, _step_bound(n, cap=15, span=MAX_VALUE // 2))
    start = _uniform(rng, 0, MAX_VALUE // 2)
    return [(start + i * step) * (2 if i % 3 == 2 else 1) for i in range(n)]


GEOMETRIC_RATIOS = ((5, 4), (4, 3), (3, 2))  # non-integer ratios p / q


@lru_cache(maxsize=64)
def _geometric_starts(n: int) -> tuple[tuple[int, int, int], ...]:
    """(p, q, largest start) for every ratio p / q whose n terms can stay <= 255 from start 1."""
    exponent = n - 1
    choices = ((p, q, MAX_VALUE * q**exponent // p**exponent) for p, q in GEOMETRIC_RATIOS)
    return tuple(choice for choice in choices if choice[2] >= 1)


def _rounded_geometric(rng: np.random.Generator, n: int, rounding: Callable[[int, int], int]) -> list[int] | None:
    choices = _geometric_starts(n)
    if not choices:
        return None
    p, q, largest_start = choices[_uniform(rng, 0, len(choices) - 1)]
    start = _uniform(rng, 1, largest_start)
    return [rounding(start * p**i, q**i) for i in range(n)]


def _floor_division(numerator: int, denominator: int) -> int:
    return numerator // denominator


def _ceil_division(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _floor_geometric(rng: np.random.Generator, n: int) -> list[int] | None:
    return _rounded_geometric(rng, n, _floor_division)


def _ceil_geometric(rng: np.random.Generator, n: int) -> list[int] | None:
    return _rounded_geometric(rng, n, _ceil_division)


def _alternating_signs(rng: np.random.Generator, n: int) -> list[int] | None:
    largest_magnitude = SIGNED_OFFSET - 1
    step = _nonzero(rng, _step_bound(n, cap=15, span=largest_magnitude - 1))
    magnitudes = _place(rng, [i * step for i in range(n)], low=1, high=largest_magnitude)
    if magnitudes is None:
        return None
    return [SIGNED_OFFSET + (-1) ** i * magnitude for i, magnitude in enumerate(magnitudes)]


PARITY_INCREMENTS = (1, 3, 5, 7, 9)  # odd, so the rule keeps switching between its two branches


def _parity_sequence(start: int, increment: int, n: int) -> list[int]:
    values = [start]
    for _ in range(n - 1):
        previous = values[-1]
        values.append(previous + increment if previous % 2 == 0 else 2 * previous)
    return values


@lru_cache(maxsize=64)
def _parity_parameters(n: int) -> tuple[tuple[int, int], ...]:
    """Every (start, increment) whose n terms stay within range (the values roughly double every 2 steps)."""
    candidates = ((start, c) for start in range(MIN_VALUE, MODULUS) for c in PARITY_INCREMENTS)
    return tuple(pair for pair in candidates if _in_range(_parity_sequence(*pair, n)))


def _parity_rule(rng: np.random.Generator, n: int) -> list[int] | None:
    parameters = _parity_parameters(n)
    if not parameters:
        return None
    start, increment = parameters[_uniform(rng, 0, len(parameters) - 1)]
    return _parity_sequence(start, increment, n)


def _threshold_switch(rng: np.random.Generator, n: int) -> list[int]:
    rise, fall = _uniform(rng, 1, 20), _uniform(rng, 1, 20)
    threshold = _uniform(rng, fall, MODULUS - rise)  # keeps x + rise <= 255 below it and x - fall >= 0 above
    reach = max(1, (n - 1) // 2)  # start close enough that the window crosses the threshold
    values = [_uniform(rng, max(MIN_VALUE, threshold - reach * rise), min(MAX_VALUE, threshold + reach * fall - 1))]
    for _ in range(n - 1):
        previous = values[-1]
        values.append(previous + rise if previous < threshold else previous - fall)
    return values


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------

_FAMILY_SPECS: tuple[tuple[str, int, Draw, str], ...] = (
    ("constant", 1, _constant, "order 0: a, a, a, ..."),
    ("arithmetic", 1, _arithmetic, "order 1: a + i*d with d != 0 (d may be negative)"),
    ("alternating", 1, _alternating, "order 2: x_n = x_{n-2}, a, b, a, b, ... with a != b"),
    ("alternating_steps", 2, _alternating_steps, "steps alternate +s1, +s2 (s1 != s2, both != 0)"),
    ("growing_steps", 2, _growing_steps, "steps d, d+c, d+2c, ... with c >= 1"),
    ("shrinking_steps", 2, _shrinking_steps, "steps d, d-c, d-2c, ... with c >= 1 (steps may turn negative)"),
    ("geometric", 2, _geometric, "x_{n+1} = r * x_n mod 256, r in {2, 3}"),
    ("alternating_factors", 2, _alternating_factors, "multiply by 2 and 3 alternately, mod 256"),
    ("rational_factors", 2, _rational_factors, "x//2 and (3*x)//2 alternately (floor), never reaching 0"),
    ("two_step", 2, _two_step, "each value twice, then + d: a, a, a+d, a+d, ..."),
    ("three_step", 2, _three_step, "each value three times, then + d: a, a, a, a+d, ..."),
    ("mixed_periods", 2, _mixed_periods, "step cycle (+d, 0, +d): 1, 2, 2, 3, 4, 4, ..."),
    ("fibonacci_mod", 3, _fibonacci_mod, "x_n = (x_{n-1} + x_{n-2}) mod m, m in 2..10"),
    ("double_every_third", 3, _double_every_third, "a + i*d, doubled where i % 3 == 2"),
    ("floor_geometric", 3, _floor_geometric, "floor(a * r**i), r in {5/4, 4/3, 3/2}"),
    ("ceil_geometric", 3, _ceil_geometric, "ceil(a * r**i), r in {5/4, 4/3, 3/2}"),
    ("alternating_signs", 3, _alternating_signs, "128 + (-1)**i * (b + i*d) with b + i*d in 1..127"),
    ("parity_rule", 3, _parity_rule, "x + c (odd c) if x is even, else 2 * x"),
    ("threshold_switch", 3, _threshold_switch, "x + a if x < T, else x - b"),
)

FAMILIES: dict[str, Family] = {
    name: Family(name=name, phase=phase, sample=_redrawn_until_in_range(name, draw), rule=rule)
    for name, phase, draw, rule in _FAMILY_SPECS
}
FAMILY_NAMES: list[str] = list(FAMILIES)
FAMILY_IDS_BY_PHASE: dict[int, np.ndarray] = {
    phase: np.array([i for i, name in enumerate(FAMILY_NAMES) if FAMILIES[name].phase == phase]) for phase in PHASES
}


def decode_family(idx: int) -> str:
    """Name of the family with integer id `idx` (as found in a batch's "family" entry)."""
    return FAMILY_NAMES[int(idx)]


def families_in_phase(phase: int) -> list[str]:
    """Names of the families of one curriculum phase, in registry order."""
    return [FAMILY_NAMES[i] for i in FAMILY_IDS_BY_PHASE[phase]]
