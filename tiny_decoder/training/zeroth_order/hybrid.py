"""Lightning glue for zeroth-order training (``optimizer=finite_difference``), shared by every task, and the
hybrid schedule run through it.

``DecoderTask.configure_optimizers`` hands a :class:`ZerothOrderOptimizer` to :func:`configure_zeroth_order`,
which switches the task to manual optimization and routes its training step through
:class:`ZerothOrderTraining`. No task carries code of its own for this: the loss of a batch comes from
:func:`training_loss` -- the task's ``training_loss(batch)`` when it defines one, otherwise the task's own
``training_step`` (its return value is the loss) with ``self.log`` muted.

A step, by phase (``optimizer.hybrid``, a :class:`HybridSchedule`, switches at ``switch_step``, either way round):

- ``finite_difference``: ``optimizer.estimate(loss on this batch)`` (all evaluations under ``no_grad``, the
  same batch and RNG state), then the Lightning optimizer's ``step()`` applies it (so ``global_step``,
  profiling and ``on_before_optimizer_step`` behave as usual).
- ``backprop``: forward, ``manual_backward``, clipping with the trainer's ``gradient_clip_val`` through the
  task's ``configure_gradient_clipping`` (Lightning leaves clipping to the module under manual optimization),
  step of the hybrid's first-order optimizer (``conf/optimizer/adamw.yaml`` unless overridden).

Every scheduler is stepped once per training step, so each optimizer follows the same schedule of the run.
Logged: ``train/loss``, ``train/projected_grad``, ``fd/epsilon``, ``fd/step_size``, ``fd/evaluations``,
``fd/backprop`` (1 in the backprop phase) and ``fd/sensitivity/<tensor>`` after each sensitivity probe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import lightning as L
import torch
from torch.optim.lr_scheduler import LRScheduler

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.training.schedulers import SchedulerFactory, step_schedule
from tiny_decoder.training.zeroth_order.optimizer import PHASES, ZerothOrderOptimizer


def training_loss(task: L.LightningModule, batch: Any, batch_idx: int) -> torch.Tensor:
    """The task's training loss on ``batch``: ``task.training_loss(batch)`` when the task defines it, else
    the task's own ``training_step`` (which returns the loss, as automatic optimization requires) with its
    logging muted -- it runs once per perturbation, and under ``vmap`` on batched tensors."""
    custom = getattr(task, "training_loss", None)
    if custom is not None:
        return custom(batch)
    with _muted_logging(task):
        output = type(task).training_step(task, batch, batch_idx)
    loss = output["loss"] if isinstance(output, Mapping) else output
    if loss is None:
        raise RuntimeError(f"{type(task).__name__}.training_step returned no loss; zeroth-order training needs one")
    return loss


@contextmanager
def _muted_logging(task: L.LightningModule) -> Iterator[None]:
    vars(task).update(log=_ignore, log_dict=_ignore)  # instance attributes shadow the methods until deleted
    try:
        yield
    finally:
        del task.log, task.log_dict


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def configure_zeroth_order(
    task: L.LightningModule, optimizer: ZerothOrderOptimizer, scheduler_factory: SchedulerFactory | None
) -> list[dict[str, Any] | torch.optim.Optimizer]:
    """What ``configure_optimizers`` returns for a zeroth-order optimizer (plus the hybrid's backprop one), each
    with its own step schedule."""
    _check_trainer(task.trainer)
    task.automatic_optimization = False
    model = task.model
    assert isinstance(model, torch.nn.Module), "the task keeps its network in task.model"
    optimizer.bind(model)
    optimizers: list[torch.optim.Optimizer] = [optimizer]
    backprop = optimizer.hybrid.backprop
    if optimizer.hybrid.uses_backprop:
        assert backprop is not None  # HybridSchedule refuses a switch_step without one
        optimizers.append(backprop(optimizer.backprop_groups()))
    # The task's own training_step is replaced on this instance only: it becomes ZerothOrderTraining's.
    vars(task)["training_step"] = ZerothOrderTraining(task, optimizer).training_step
    return [step_schedule(opt, scheduler_factory, task.trainer) for opt in optimizers]


def _check_trainer(trainer: L.Trainer) -> None:
    if trainer.world_size > 1:
        raise ConfigError(
            "optimizer=finite_difference runs on one device (ranks would perturb differently); use trainer=cpu/gpu"
        )
    if trainer.accumulate_grad_batches != 1:
        raise ConfigError("optimizer=finite_difference takes one batch per step: set trainer.accumulate_grad_batches=1")


class ZerothOrderTraining:
    """The manual-optimization training step of a task trained with a :class:`ZerothOrderOptimizer`."""

    def __init__(self, task: L.LightningModule, optimizer: ZerothOrderOptimizer):
        self.task = task
        self.optimizer = optimizer
        self.phase: str | None = None
        self.steps: dict[str, Callable[[Any, int], torch.Tensor]] = {
            "finite_difference": self._finite_difference_step,
            "backprop": self._backprop_step,
        }

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        phase = self.optimizer.hybrid.phase_at(self.task.global_step)
        if phase != self.phase:
            self._enter(phase)
        loss = self.steps[phase](batch, batch_idx)
        self._step_schedulers()
        self.task.log("train/loss", loss, prog_bar=True)
        self.task.log("fd/backprop", float(PHASES.index(phase)))
        return loss

    def _lightning_optimizers(self) -> list[Any]:
        optimizers = self.task.optimizers()
        return optimizers if isinstance(optimizers, list) else [optimizers]

    def _enter(self, phase: str) -> None:
        """Free the first-order gradients when finite differences take over (they would only cost memory)."""
        self.phase = phase
        for optimizer in self._lightning_optimizers()[1:]:
            optimizer.zero_grad(set_to_none=True)

    def _finite_difference_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.optimizer.estimate(partial(training_loss, self.task, batch, batch_idx))
        self._lightning_optimizers()[0].step()
        self._log_statistics()
        return self.optimizer.stats["loss"]

    def _backprop_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self._lightning_optimizers()[1]
        loss = training_loss(self.task, batch, batch_idx)
        optimizer.zero_grad(set_to_none=True)
        self.task.manual_backward(loss)
        # the trainer's gradient_clip_val / _algorithm (none when unset), through the task's hook as automatic
        # optimization calls it (DecoderTask's clips a fused AdamW under mixed precision too)
        trainer = self.task.trainer
        self.task.configure_gradient_clipping(
            optimizer.optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        )
        optimizer.step()
        return loss.detach()

    def _step_schedulers(self) -> None:
        schedulers = self.task.lr_schedulers()
        if schedulers is None:
            return
        with warnings.catch_warnings():  # the idle phase's scheduler follows the run's steps without its optimizer
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            # step_schedule's: SchedulerFactory's LRSchedulers, stepped every step without a metric
            for scheduler in cast("list[LRScheduler]", schedulers if isinstance(schedulers, list) else [schedulers]):
                scheduler.step()

    def _log_statistics(self) -> None:
        stats = self.optimizer.stats
        log = self.task.log
        log("train/projected_grad", float(stats["projected_grad"]))
        log("fd/epsilon", float(stats["epsilon"]))
        log("fd/step_size", float(stats["step_size"]))
        log("fd/evaluations", float(stats["evaluations"]))
        for name, score in stats["sensitivity"].items():
            log(f"fd/sensitivity/{name}", score)
