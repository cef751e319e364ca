"""Learning-rate schedules built from torch's own schedulers (used as Hydra ``_partial_`` targets).

``warmup_cosine``: linear warmup then cosine decay to ``min_lr`` (``LinearLR`` -> ``CosineAnnealingLR``
chained by ``SequentialLR``). ``constant``: optional linear warmup, then flat.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from tiny_decoder.core.errors import ConfigError


def _warmup(optimizer: Optimizer, warmup_steps: int) -> LinearLR:
    return LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 5000, min_lr: float = 1e-6
) -> LRScheduler:
    """Linear warmup over ``warmup_steps`` (never past ``total_steps``), then cosine decay to ``min_lr``."""
    if total_steps <= 0:
        raise ConfigError(f"scheduler needs a positive number of training steps, got {total_steps}")
    if warmup_steps < 0:
        raise ConfigError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    warmup_steps = min(warmup_steps, total_steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=min_lr)
    if warmup_steps == 0:
        return cosine
    return SequentialLR(optimizer, [_warmup(optimizer, warmup_steps), cosine], milestones=[warmup_steps])


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LRScheduler:
    """Flat learning rate after an optional linear warmup."""
    flat = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps <= 0:
        return flat
    return SequentialLR(optimizer, [_warmup(optimizer, warmup_steps), flat], milestones=[warmup_steps])
