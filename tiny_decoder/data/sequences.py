"""Integer-sequence families for next-number prediction, batch generation, and the Lightning data module.

Contents
- `Family` and the registry `FAMILIES` (name -> Family, ordered): 19 generators grouped into the three
  curriculum phases of the design card. `FAMILY_NAMES[i]` is the family with integer id ``i`` in batches.
- `generate_sequences`: draws a batch of sequences for a given phase mix.
- `SequenceDataModule`: fresh training data every epoch (mix from a `Curriculum`), fixed validation and
  test sets.

Value range and mappings
Every value lies in [0, 255] (one class per value, vocabulary 256). Parameters are drawn at random and a
draw is rejected and redrawn (at most `MAX_DRAWS` times, then RuntimeError) when a term leaves the range.
Four families use a documented mapping into the range:
- `geometric`, `alternating_factors`: with integer ratios >= 2 nine exact terms cannot fit in [0, 255]
  (2**8 = 256), so their products are reduced modulo 256 (arithmetic in Z/256, the value vocabulary):
  ``x_{i+1} = (r * x_i) % 256``. The sequence is exact while it fits and wraps afterwards.
- `rational_factors`: the factors 1/2 and 3/2 are applied with floor: ``x // 2`` and ``(3 * x) // 2``.
- `alternating_signs`: a signed value v in [-128, 127] is encoded as ``v + 128``.

The families are tuned for the default window of 9 terms (8 inputs + 1 next number); the data module
accepts ``seq_len <= MAX_SEQ_LEN``, the longest window every family can fill within [0, 255].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from tiny_decoder.data.curriculum import Curriculum

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
_FAMILY_IDS_BY_PHASE: dict[int, np.ndarray] = {
    phase: np.array([i for i, name in enumerate(FAMILY_NAMES) if FAMILIES[name].phase == phase]) for phase in PHASES
}


def decode_family(idx: int) -> str:
    """Name of the family with integer id `idx` (as found in a batch's "family" entry)."""
    return FAMILY_NAMES[int(idx)]


def families_in_phase(phase: int) -> list[str]:
    """Names of the families of one curriculum phase, in registry order."""
    return [FAMILY_NAMES[i] for i in _FAMILY_IDS_BY_PHASE[phase]]


# --------------------------------------------------------------------------------------------------------
# Batch generation
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceSamples:
    """A batch of sequences: `values` (n, length + 1) int64, `phase` (n,) in 1..3, `family` (n,) ids."""

    values: torch.Tensor
    phase: torch.Tensor
    family: torch.Tensor

    def __len__(self) -> int:
        return len(self.values)


def normalise_mix(phase_mix: Sequence[float]) -> np.ndarray:
    """Phase weights as probabilities; raises ValueError unless 3 finite weights >= 0 with positive sum."""
    weights = np.asarray(list(phase_mix), dtype=np.float64)
    if weights.shape != (len(PHASES),):
        raise ValueError(f"phase_mix must have exactly {len(PHASES)} weights (phases 1, 2, 3), got {weights}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"phase_mix weights must be finite, >= 0 and have a positive sum, got {weights}")
    return weights / weights.sum()


def generate_sequences(rng: np.random.Generator, n: int, length: int, phase_mix: Sequence[float]) -> SequenceSamples:
    """Draw n sequences of length + 1 terms: the phase from `phase_mix`, then a family uniformly within it."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if length < 1:
        raise ValueError(f"length must be >= 1 (inputs before the next number), got {length}")
    probabilities = normalise_mix(phase_mix)
    phases = np.asarray(PHASES)[rng.choice(len(PHASES), size=n, p=probabilities)]
    family_ids = np.empty(n, dtype=np.int64)
    for phase in PHASES:
        rows = np.flatnonzero(phases == phase)
        candidates = _FAMILY_IDS_BY_PHASE[phase]
        family_ids[rows] = candidates[rng.integers(0, len(candidates), size=len(rows))]
    samplers = [FAMILIES[name].sample for name in FAMILY_NAMES]
    values = np.array([samplers[family_id](rng, length + 1) for family_id in family_ids], dtype=np.int64)
    return SequenceSamples(
        values=torch.from_numpy(values.reshape(n, length + 1)),
        phase=torch.from_numpy(phases.astype(np.int64)),
        family=torch.from_numpy(family_ids),
    )


class SequenceDataset(Dataset):
    """Pre-generated sequences served as {"input", "target", "phase", "family"}; target = input shifted by 1."""

    def __init__(self, samples: SequenceSamples) -> None:
        self.inputs = samples.values[:, :-1]
        self.targets = samples.values[:, 1:]
        self.phase = samples.phase
        self.family = samples.family

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input": self.inputs[index],
            "target": self.targets[index],
            "phase": self.phase[index],
            "family": self.family[index],
        }


# --------------------------------------------------------------------------------------------------------
# Data module
# --------------------------------------------------------------------------------------------------------

UNIFORM_MIX = (1.0, 1.0, 1.0)
_VAL_STREAM, _TEST_STREAM = 1, 2


def _evaluation_rng(seed: int, stream: int) -> np.random.Generator:
    """Generator for a fixed evaluation set. The spawn key keeps it disjoint from every training stream
    ``default_rng([seed, epoch])`` (and from the other evaluation set), even when the seeds coincide."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def _require_int(name: str, value: object, minimum: int, hint: str = "") -> None:
    """Raise ValueError naming `name` unless `value` is an integer >= `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}{hint}, got {value}")


class SequenceDataModule(L.LightningDataModule):
    """Next-number prediction data: batches ``{"input": (B, seq_len), "target": (B, seq_len), "phase": (B,),
    "family": (B,)}`` (all int64), where target[:, t] is the number after input[:, t].

    Training data is fresh every epoch: `train_dataloader` draws `train_samples_per_epoch` sequences from
    ``np.random.default_rng([seed, epoch])`` with the phase mix ``curriculum.mix_at(epoch)`` (uniform when
    no curriculum is given). The caller must configure the trainer with ``reload_dataloaders_every_n_epochs=1``
    so this is called every epoch; otherwise the first epoch's data is reused (a warning says so).
    Validation and test sets are drawn once, phase-balanced, from `val_seed` / `test_seed`.
    """

    decode_family = staticmethod(decode_family)

    def __init__(
        self,
        *,
        seq_len: int = 8,
        batch_size: int = 32,
        train_samples_per_epoch: int = 32000,
        val_samples: int = 100,
        test_samples: int = 2000,
        seed: int = 0,
        val_seed: int = 1,
        test_seed: int = 2,
        curriculum: Curriculum | None = None,
        num_workers: int = 0,
        max_value: int = MAX_VALUE,
    ) -> None:
        super().__init__()
        _require_int("seq_len", seq_len, 2)
        if seq_len > MAX_SEQ_LEN:
            raise ValueError(
                f"seq_len must be <= {MAX_SEQ_LEN} (the longest window every family can fill within "
                f"[0, {MAX_VALUE}]), got {seq_len}"
            )
        _require_int("batch_size", batch_size, 1)
        _require_int("train_samples_per_epoch", train_samples_per_epoch, 1)
        _require_int("val_samples", val_samples, 1)
        _require_int("test_samples", test_samples, 1)
        for name, value in (("seed", seed), ("val_seed", val_seed), ("test_seed", test_seed)):
            _require_int(name, value, 0)
        _require_int("num_workers", num_workers, 0)
        _require_int("max_value", max_value, MAX_VALUE, hint=" (the generators produce values up to 255)")
        if curriculum is not None and not isinstance(curriculum, Curriculum):
            raise ValueError(
                "curriculum must be a Curriculum or None (in Hydra give it a "
                f"_target_: tiny_decoder.data.curriculum.Curriculum), got {type(curriculum).__name__}"
            )
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_samples_per_epoch = train_samples_per_epoch
        self.val_samples = val_samples
        self.test_samples = test_samples
        self.seed = seed
        self.val_seed = val_seed
        self.test_seed = test_seed
        self.curriculum = curriculum
        self.num_workers = num_workers
        self.max_value = max_value
        self.train_mix: np.ndarray | None = None  # the phase mix of the latest training epoch
        self._val_set: SequenceDataset | None = None
        self._test_set: SequenceDataset | None = None

    @property
    def vocab_size(self) -> int:
        return self.max_value + 1

    @property
    def context_length(self) -> int:
        return self.seq_len

    def phase_mix_at(self, epoch: float) -> np.ndarray:
        """Training phase probabilities at `epoch`."""
        if self.curriculum is None:
            return normalise_mix(UNIFORM_MIX)
        return self.curriculum.mix_at(epoch)

    def setup(self, stage: str | None = None) -> None:
        if self._val_set is None:
            self._val_set = self._evaluation_set(self.val_samples, _evaluation_rng(self.val_seed, _VAL_STREAM))
        if self._test_set is None:
            self._test_set = self._evaluation_set(self.test_samples, _evaluation_rng(self.test_seed, _TEST_STREAM))

    def train_dataloader(self) -> DataLoader:
        epoch = self._current_epoch()
        self.train_mix = self.phase_mix_at(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        samples = generate_sequences(rng, self.train_samples_per_epoch, self.seq_len, self.train_mix)
        return self._loader(SequenceDataset(samples), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._test_set, shuffle=False)

    def _evaluation_set(self, n: int, rng: np.random.Generator) -> SequenceDataset:
        return SequenceDataset(generate_sequences(rng, n, self.seq_len, UNIFORM_MIX))

    def _loader(self, dataset: SequenceDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def _current_epoch(self) -> int:
        if self.trainer is None:
            return 0
        if self.trainer.reload_dataloaders_every_n_epochs != 1:
            rank_zero_warn(
                "SequenceDataModule draws fresh training data per epoch only when the Trainer has "
                "reload_dataloaders_every_n_epochs=1; with "
                f"{self.trainer.reload_dataloaders_every_n_epochs} epochs are reused."
            )
        return self.trainer.current_epoch
