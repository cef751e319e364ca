"""Zeroth-order (finite-difference) training: gradient estimates from loss differences, no backward pass.

The reference for the memory-efficient form is MeZO (Malladi et al. 2023, arXiv 2305.17333): SPSA with
the random direction regenerated from a seed, the parameters perturbed in place and restored, and no
stored gradient. :class:`ZerothOrderOptimizer` is a ``torch.optim.Optimizer`` (so LR schedulers,
checkpoints and Lightning work unchanged) whose ``step(closure)`` evaluates ``closure()`` -- the loss of
the model on one fixed batch -- at perturbed parameters and applies the estimated update. Plain torch::

    optimizer = ZerothOrderOptimizer(model.parameters(), lr=1e-3, directions=4)
    optimizer.bind(model)  # parameter names for logs; needed by parallel="vmap"
    loss = optimizer.step(lambda: loss_fn(model))

Every choice is a registry entry named by a config string (``optimizer.<key>`` in Hydra), each in the module
of its job:

- ``directions``: the ``distribution`` of ``z``, the directions and the ``estimator`` (``spsa``, ``coordinate``).
- ``evaluators``: the difference ``scheme`` (``central``, ``forward``) and how the perturbed points are
  evaluated (``parallel``: ``sequential`` in place, or ``vmap`` batched), under one replayed RNG state.
- ``per_tensor``: ``epsilon`` (``fixed``, ``relative``, ``sensitivity``), the ``tensors`` a step perturbs
  (``all``, ``uniform``, ``sensitivity``) and the ``sensitivity`` probes behind them.
- ``optimizer``: :class:`ZerothOrderOptimizer`, its state, ``momentum_mode`` (``seeds``, ``buffer``),
  ``line_search`` and the ``hybrid`` schedule's options.
- ``hybrid``: the Lightning glue (manual optimization) that trains a task with it and switches between finite
  differences and backprop.

Invariants: each forward of a step sees the same batch (the closure) and the same RNG state (restored
before every evaluation); directions come from generators seeded by ``(seed, step, direction, tensor)``,
so a seed reproduces a run; with ``parallel: sequential`` and ``momentum_mode: seeds`` no gradient-sized
tensor nor copy of the parameters is ever allocated -- one tensor's direction at a time.
"""

from tiny_decoder.training.zeroth_order.hybrid import configure_zeroth_order, training_loss
from tiny_decoder.training.zeroth_order.optimizer import HybridSchedule, ZerothOrderOptimizer

__all__ = ["HybridSchedule", "ZerothOrderOptimizer", "configure_zeroth_order", "training_loss"]
