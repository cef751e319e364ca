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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from numbers import Integral, Real

import numpy as np

NUM_PHASES = 3
KEYFRAME_KEYS = ("epoch", "mix")
DEFAULT_FINAL_MIX = (0.2, 0.4, 0.4)


@dataclass(frozen=True)
class Keyframe:
    """The phase mix that holds exactly at `epoch`; `mix` is normalised to sum to 1."""

    epoch: int
    mix: tuple[float, float, float]


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _parse_epoch(raw: object, where: str) -> int:
    if not isinstance(raw, Integral) or isinstance(raw, bool):
        raise ValueError(f"{where}.epoch must be an integer, got {raw!r}")
    if raw < 0:
        raise ValueError(f"{where}.epoch must be >= 0, got {raw}")
    return int(raw)


def _parse_mix(raw: object, where: str) -> tuple[float, float, float]:
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        raise ValueError(f"{where}.mix must be a list of {NUM_PHASES} weights, got {raw!r}")
    weights = list(raw)
    if len(weights) != NUM_PHASES:
        raise ValueError(
            f"{where}.mix must have exactly {NUM_PHASES} weights (phases 1, 2, 3), got {len(weights)}: {weights}"
        )
    if not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"{where}.mix weights must be finite numbers >= 0, got {weights}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"{where}.mix must have a positive sum (at least one weight > 0), got {weights}")
    return tuple(float(w) / total for w in weights)


def _parse_keyframe(raw: object, index: int) -> Keyframe:
    where = f"keyframes[{index}]"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping like {{'epoch': 0, 'mix': [1, 0, 0]}}, got {raw!r}")
    keys = set(raw.keys())
    missing = [key for key in KEYFRAME_KEYS if key not in keys]
    unknown = sorted(str(key) for key in keys - set(KEYFRAME_KEYS))
    if missing or unknown:
        raise ValueError(
            f"{where} must have exactly the keys 'epoch' and 'mix' (missing: {missing}, unknown: {unknown})"
        )
    return Keyframe(epoch=_parse_epoch(raw["epoch"], where), mix=_parse_mix(raw["mix"], where))


class Curriculum:
    """Phase-mix schedule, piecewise linear in the epoch between keyframes (see the module docstring)."""

    def __init__(self, keyframes: Iterable[Mapping]) -> None:
        if isinstance(keyframes, (str, bytes, Mapping)) or not isinstance(keyframes, Iterable):
            raise ValueError(f"keyframes must be a list of {{'epoch', 'mix'}} mappings, got {keyframes!r}")
        parsed = [_parse_keyframe(raw, index) for index, raw in enumerate(keyframes)]
        if not parsed:
            raise ValueError("keyframes must contain at least one keyframe, got an empty list")
        for index, (before, after) in enumerate(pairwise(parsed), start=1):
            if after.epoch <= before.epoch:
                raise ValueError(
                    f"keyframes[{index}].epoch must be greater than the previous keyframe's epoch "
                    f"(epochs strictly increasing), got {after.epoch} after {before.epoch}"
                )
        self.keyframes: tuple[Keyframe, ...] = tuple(parsed)
        self._epochs = np.array([frame.epoch for frame in parsed], dtype=np.float64)
        self._mixes = np.array([frame.mix for frame in parsed], dtype=np.float64)

    @classmethod
    def linear(cls, transition_epochs: int = 10, final_mix: Sequence[float] = DEFAULT_FINAL_MIX) -> Curriculum:
        """Default three-stage schedule: phase 1 only at epoch 0, half phase 1 / half phase 2 at
        `transition_epochs`, then `final_mix` (default 20% / 40% / 40%) from 2 * `transition_epochs` on."""
        if not isinstance(transition_epochs, int) or isinstance(transition_epochs, bool) or transition_epochs < 1:
            raise ValueError(f"transition_epochs must be a positive integer, got {transition_epochs!r}")
        return cls(
            [
                {"epoch": 0, "mix": [1.0, 0.0, 0.0]},
                {"epoch": transition_epochs, "mix": [0.5, 0.5, 0.0]},
                {"epoch": 2 * transition_epochs, "mix": list(final_mix)},
            ]
        )

    def mix_at(self, epoch: float) -> np.ndarray:
        """Phase weights (3 floats summing to 1) at `epoch`, which may be fractional."""
        if not _is_number(epoch) or not math.isfinite(epoch):
            raise ValueError(f"epoch must be a finite number, got {epoch!r}")
        mix = np.array([np.interp(epoch, self._epochs, self._mixes[:, phase]) for phase in range(NUM_PHASES)])
        return mix / mix.sum()

    def __repr__(self) -> str:
        frames = ", ".join(
            f"{{epoch: {frame.epoch}, mix: [{', '.join(f'{w:.3g}' for w in frame.mix)}]}}" for frame in self.keyframes
        )
        return f"Curriculum([{frames}])"
