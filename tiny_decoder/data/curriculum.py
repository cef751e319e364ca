"""The curriculum: how the training mix of the three sequence phases changes over epochs.

A `Curriculum` is a list of keyframes ``{"epoch": int, "mix": [w1, w2, w3]}``, where ``w1..w3`` are the
relative weights of phase 1 (simple recurrences), phase 2 (nested recurrences) and phase 3 (combined,
transformed and conditional relations). Between keyframes the mix is interpolated linearly, so phases
overlap and the transition is gradual (design card, "Training Phase Transitions"); before the first keyframe
the first mix holds, after the last keyframe the last mix holds.

Hydra example (``_target_`` instantiation, the keyframes may arrive as an OmegaConf ListConfig)::

    curriculum:
      _target_: tiny_decoder.data.curriculum.Curriculum
      keyframes:
        - {epoch: 0, mix: [1, 0, 0]}
        - {epoch: 10, mix: [0.5, 0.5, 0]}
        - {epoch: 20, mix: [0.2, 0.4, 0.4]}
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from numbers import Integral, Real
from typing import Any, cast

import numpy as np

from tiny_decoder.core.checks import check, check_int
from tiny_decoder.core.errors import ConfigError

NUM_PHASES = 3
KEYFRAME_KEYS = ("epoch", "mix")
DEFAULT_FINAL_MIX = (0.2, 0.4, 0.4)
FIELD = "data.curriculum"  # where the config tree holds the curriculum (conf/data/sequences.yaml)


@dataclass(frozen=True)
class Keyframe:
    """The phase mix that holds exactly at `epoch`; `mix` is normalised to sum to 1."""

    epoch: int
    mix: tuple[float, float, float]


def _is_real(value: object) -> bool:
    """A finite real number (numpy scalars included, a bool not)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_epoch(value: object) -> bool:
    """An integer >= 0 (numpy integers included, a bool not)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= 0


def _is_list(value: object) -> bool:
    return not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Iterable)


def normalised_mix(field: str, raw: object) -> tuple[float, float, float]:
    """The phase weights ``raw`` (``NUM_PHASES`` finite numbers >= 0 with a positive sum) scaled to sum to 1;
    ConfigError ``<field> must be ..., got ...`` otherwise."""
    wanted = f"a list of exactly {NUM_PHASES} weights (phases 1, 2, 3)"
    weights = list(cast("Iterable[Any]", check(field, raw, _is_list, wanted)))  # _is_list: an iterable
    check(field, weights, lambda w: len(w) == NUM_PHASES, wanted)
    check(field, weights, lambda w: all(_is_real(x) and x >= 0 for x in w), "weights that are finite numbers >= 0")
    values = [float(w) for w in weights]
    total = sum(values)
    check(field, weights, lambda _: total > 0, "weights with a positive sum (at least one weight > 0)")
    first, second, third = (value / total for value in values)
    return first, second, third


def _parse_keyframe(raw: object, index: int) -> Keyframe:
    where = f"{FIELD}.keyframes[{index}]"
    frame = cast(
        "Mapping[Any, Any]",
        check(where, raw, lambda r: isinstance(r, Mapping), "a mapping like {'epoch': 0, 'mix': [1, 0, 0]}"),
    )
    keys = set(frame.keys())
    missing = [key for key in KEYFRAME_KEYS if key not in keys]
    unknown = sorted(str(key) for key in keys - set(KEYFRAME_KEYS))
    if missing or unknown:
        raise ConfigError(
            f"{where} must have exactly the keys 'epoch' and 'mix' (missing: {missing}, unknown: {unknown})"
        )
    epoch = check(f"{where}.epoch", frame["epoch"], _is_epoch, "an integer >= 0")
    return Keyframe(epoch=int(epoch), mix=normalised_mix(f"{where}.mix", frame["mix"]))


class Curriculum:
    """Phase-mix schedule, piecewise linear in the epoch between keyframes (see the module docstring)."""

    def __init__(self, keyframes: Iterable[Mapping]) -> None:
        check(f"{FIELD}.keyframes", keyframes, _is_list, "a list of {'epoch', 'mix'} mappings")
        parsed = [_parse_keyframe(raw, index) for index, raw in enumerate(keyframes)]
        check(f"{FIELD}.keyframes", parsed, bool, "a list of at least one keyframe")
        for index, (before, after) in enumerate(pairwise(parsed), start=1):
            wanted = f"greater than the previous keyframe's epoch {before.epoch} (epochs strictly increasing)"
            later = partial(operator.lt, before.epoch)  # later(epoch): before.epoch < epoch
            check(f"{FIELD}.keyframes[{index}].epoch", after.epoch, later, wanted)
        self.keyframes: tuple[Keyframe, ...] = tuple(parsed)
        self._epochs = np.array([frame.epoch for frame in parsed], dtype=np.float64)
        self._mixes = np.array([frame.mix for frame in parsed], dtype=np.float64)

    @classmethod
    def linear(cls, transition_epochs: int = 10, final_mix: Sequence[float] = DEFAULT_FINAL_MIX) -> Curriculum:
        """Default three-stage schedule: phase 1 only at epoch 0, half phase 1 / half phase 2 at
        `transition_epochs`, then `final_mix` (default 20% / 40% / 40%) from 2 * `transition_epochs` on."""
        check_int("transition_epochs", transition_epochs, 1)
        return cls(
            [
                {"epoch": 0, "mix": [1.0, 0.0, 0.0]},
                {"epoch": transition_epochs, "mix": [0.5, 0.5, 0.0]},
                {"epoch": 2 * transition_epochs, "mix": list(final_mix)},
            ]
        )

    def mix_at(self, epoch: float) -> np.ndarray:
        """Phase weights (3 floats summing to 1) at `epoch`, which may be fractional."""
        check("epoch", epoch, _is_real, "a finite number")
        mix = np.array([np.interp(epoch, self._epochs, self._mixes[:, phase]) for phase in range(NUM_PHASES)])
        return mix / mix.sum()

    def __repr__(self) -> str:
        frames = ", ".join(
            f"{{epoch: {frame.epoch}, mix: [{', '.join(f'{w:.3g}' for w in frame.mix)}]}}" for frame in self.keyframes
        )
        return f"Curriculum([{frames}])"
