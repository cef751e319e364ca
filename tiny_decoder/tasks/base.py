"""``DecoderTask``: what every task shares, as a thin LightningModule over the plain model.

It builds the :class:`DecoderTransformer` from a model-config dict (stored in the checkpoint's
hyper-parameters, so a checkpoint rebuilds the exact model), sets ``example_input_array`` for the model
summary, and configures the optimizer and per-step LR schedule from Hydra ``_partial_`` factories with
weight decay only on matrices (not biases, norms or embeddings).

The training objective is :meth:`DecoderTask.training_loss`, shared by every task: the task's own ``loss``
(logits, targets) on each exit the depth strategy trains (the output alone, or every layer with early exit,
weighted), plus the distillation term when a teacher is attached (``distillation=kd``). Checkpoints of pruned
models (magnitude masks, removed heads) load into a freshly built task (``on_load_checkpoint``, ``load_task``).

``compile=true`` (:meth:`DecoderTask.compile_steps`) runs that objective (forward, loss; the backward through
AOTAutograd) and the evaluation forward (:meth:`DecoderTask.logits`) as ``torch.compile`` graphs. Functions
are compiled, not the module, so checkpoints keep their parameter names. Gradient clipping also works with
fused optimizers (``configure_gradient_clipping``), which Lightning's mixed-precision plugin refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.tasks.checkpoint import METADATA_KEY, TASKS, metadata
from tiny_decoder.training.distillation import Distiller
from tiny_decoder.training.optimizers import clip_gradients, unscales_in_step
from tiny_decoder.training.pruning import conform_to_state_dict
from tiny_decoder.training.schedulers import SchedulerFactory, step_schedule
from tiny_decoder.training.zeroth_order import ZerothOrderOptimizer, configure_zeroth_order

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class GenerationRequest:
    """What ``python -m tiny_decoder.generate`` asks a trained task for (its options, typed)."""

    prompt: str | None = None  # language model: the text to continue
    sequence: str | None = None  # sequence task: the numbers to continue ("1 2 4 7")
    steps: int = 5  # sequence task: how many numbers
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    num_samples: int = 1
    # compiled decoding: true, false or auto (the compiled program where it pays: generation.compiles_auto)
    compile: bool | str = "auto"
    weights: str = "model"  # the fast step's weight format: model (its numerics), bf16, int8 or int4 (opt-in)


@dataclass(frozen=True)
class EvaluationRequest:
    """What ``python -m tiny_decoder.evaluate`` asks a trained task for (its options, typed)."""

    batch_size: int = 32
    seed: int = 0  # sequence task: the seed of its fresh test sequences
    n: int = 3000  # sequence task: how many
    text_data: Callable[..., Any] | None = None  # language model: a text data module factory (keyword options)
    tokenizer_path: str | None = None  # language model: a tokenizer file to check against the model's
    max_blocks: int | None = None
    lambada: str | None = None  # language model: LAMBADA jsonl
    lambada_limit: int | None = None
    harness_tasks: list[str] = field(default_factory=list)  # language model: lm-evaluation-harness task names
    harness_limit: int | None = None


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups: weight decay on Linear weights, none on biases, norms and embedding tables."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_matrix = isinstance(module, nn.Linear) and name in ("weight", "weight_orig")  # _orig: pruned
            (decay if is_matrix else no_decay).append(param)
    unique_decay = list({id(p): p for p in decay}.values())
    seen = {id(p) for p in unique_decay}
    unique_no_decay = [p for p in {id(p): p for p in no_decay}.values() if id(p) not in seen]
    return [{"params": unique_decay}, {"params": unique_no_decay, "weight_decay": 0.0}]


class DecoderTask(L.LightningModule):
    """Owns the model, the optimizer/scheduler wiring and checkpoint metadata."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = DecoderTransformer(ModelConfig.from_dict(model))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.example_input_array = torch.zeros(2, self.model.config.context_length, dtype=torch.long)
        self.distiller: Distiller | None = None  # attached by the KnowledgeDistillation callback while fitting
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor (None: no FLOPs figure)
        # compiled versions of training_loss and forward (compile_steps); None: run them eagerly
        self._compiled_objective: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
        self._compiled_forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def task_name(self) -> str:
        """This task's name in :data:`TASKS` (what checkpoints and ``task=`` call it)."""
        return TASKS.name_of(type(self))

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of a validation / test batch: :meth:`forward`, compiled under ``compile=true``."""
        return self(ids) if self._compiled_forward is None else self._compiled_forward(ids)

    def objective(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`training_loss`, compiled under ``compile=true``."""
        return self.training_loss(batch) if self._compiled_objective is None else self._compiled_objective(batch)

    @property
    def is_compiled(self) -> bool:
        """Whether :meth:`compile_steps` ran: :meth:`objective` and :meth:`logits` run compiled."""
        return self._compiled_objective is not None

    def compile_steps(self, **options: Any) -> None:
        """``torch.compile(**options)`` the training objective and the evaluation forward (compiled lazily, at
        their first call; the model summary and generation stay eager)."""
        self._compiled_objective = torch.compile(self.training_loss, **options)
        self._compiled_forward = torch.compile(self.forward, **options)

    def generate_outputs(self, request: GenerationRequest) -> list[str]:
        """The texts ``generate`` prints for ``request``."""
        raise NotImplementedError

    def evaluate_outputs(self, request: EvaluationRequest) -> dict[str, float]:
        """The metrics ``evaluate`` prints for ``request``."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's loss of ``(B, T, V)`` logits against ``(B, T)`` targets."""
        raise NotImplementedError

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective (module doc): task loss on every trained exit, plus distillation if any."""
        exits = self.model.exit_logits(batch["input"])
        weights = self.model.depth.exit_weights(len(exits))
        losses = [self.loss(logits, batch["target"]) for logits in exits]
        loss = losses[0] if len(losses) == 1 else sum(w * value for w, value in zip(weights, losses, strict=True))
        if self.distiller is not None:
            loss = self.distiller.combine(loss, exits[-1], batch["input"])
        return loss

    # Steps shared by the tasks: each task builds ``val_metrics`` / ``test_metrics`` and implements
    # ``_evaluate(batch, metrics)`` (update them) and ``_log_metrics(metrics, prefix)`` (log and reset them).

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.objective(batch)  # self.loss, plus distillation / early-exit terms when configured
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: Any) -> None:
        raise NotImplementedError

    def _log_metrics(self, metrics: Any, prefix: str) -> None:
        raise NotImplementedError

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._log_depth("val", batch)

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._log_depth("test", batch)

    def _log_depth(self, prefix: str, batch: dict[str, torch.Tensor]) -> None:
        """Average blocks run per token under a dynamic depth (early exit, a LayerDrop sub-network)."""
        layers = self.model.depth.layers_per_token
        if layers is not None:
            self.log(f"{prefix}/layers_per_token", layers, batch_size=batch["input"].numel())

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured: set the optimizer config group (e.g. optimizer=adamw)")
        optimizer = self.optimizer_factory(parameter_groups(self.model))
        if isinstance(optimizer, ZerothOrderOptimizer):  # finite differences: manual optimization, own step
            return configure_zeroth_order(self, optimizer, self.scheduler_factory)
        return step_schedule(optimizer, self.scheduler_factory, self.trainer)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        if gradient_clip_val and unscales_in_step(optimizer):  # fused AdamW: Lightning's AMP plugin refuses it
            clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = metadata(self.task_name)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        conform_to_state_dict(self, checkpoint["state_dict"])  # pruned masks / heads (resume, test of best)
