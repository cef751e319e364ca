"""Seeds derived from tuples of integers: ``mix_seed(seed, epoch, batch)`` gives independent, reproducible
streams for every tuple (splitmix64 chained over the keys), and ``seeded_generator`` a torch generator from one.
The exact-resume data order, the dropout streams and the zeroth-order perturbations all draw from it."""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*keys: int) -> int:
    """A 63-bit seed determined by ``keys`` (splitmix64 chained over them)."""
    state = 0
    for key in keys:
        state = _splitmix64(state ^ (int(key) & _MASK64))
    return state >> 1


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
