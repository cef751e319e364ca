"""Learning-rate schedules built from torch's own schedulers (used as Hydra ``_partial_`` targets).

``warmup_cosine``: linear warmup then cosine decay to ``min_lr`` (``LinearLR`` -> ``CosineAnnealingLR``
chained by ``SequentialLR``). ``constant``: optional linear warmup, then flat. ``step_schedule``: what a
LightningModule's ``configure_optimizers`` returns for an optimizer and a scheduler factory (stepped every
optimizer step), used by the tasks and by the zeroth-order glue alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from tiny_decoder.core.checks import check_int

if TYPE_CHECKING:
    import lightning as L

SchedulerFactory = Callable[..., LRScheduler]  # a Hydra ``_partial_`` scheduler: factory(optimizer, total_steps=N)


def _warmup(optimizer: Optimizer, warmup_steps: int) -> LinearLR:
    return LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 5000, min_lr: float = 1e-6
) -> LRScheduler:
    """Linear warmup over ``warmup_steps`` (never past ``total_steps``), then cosine decay to ``min_lr``."""
    check_int("scheduler total_steps (the run's training steps)", total_steps, 1)
    check_int("scheduler.warmup_steps", warmup_steps, 0)
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


def step_schedule(
    optimizer: Optimizer, scheduler_factory: SchedulerFactory | None, trainer: L.Trainer
) -> dict[str, Any] | Optimizer:
    """``configure_optimizers``' value for ``optimizer``: the optimizer alone without a scheduler factory, else
    the optimizer with ``scheduler_factory(optimizer, total_steps=...)`` stepped every optimizer step, over the
    run's ``trainer.estimated_stepping_batches`` (read only when there is a scheduler: it sets up the data)."""
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer, total_steps=int(trainer.estimated_stepping_batches))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
