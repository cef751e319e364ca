"""Pruning: unstructured magnitude pruning during training, structured attention-head pruning after it.

``pruning=magnitude`` -> :class:`MagnitudePruning`, a Lightning ``ModelPruning`` configured around its pitfalls:
L1 magnitude pruning through ``torch.nn.utils.prune`` of the weights that ``modules`` selects (``PRUNABLE``:
every Linear by default, never embeddings or norms unless asked), ``local`` (each tensor to the target) or
``global`` (one threshold over all chosen tensors), on a step schedule (``SPARSITY_SCHEDULES``: ``one_shot`` at
``start_step`` or ``gradual``, Zhu & Gupta's cubic ramp from ``start_step`` to ``end_step``; a step given as a
float in [0, 1] is that fraction of the run's optimizer steps). Survivors keep
their trained values (no lottery-ticket reset) and the masks stay in the model: the optimizer updates
``weight_orig`` while the forward uses ``weight_orig * weight_mask``, so pruned weights stay zero. Checkpoints
hold ``<name>_orig`` and ``<name>_mask`` (Lightning's default would drop the masks at save);
:func:`conform_to_state_dict` re-creates the reparametrisation before such a state dict is loaded into a fresh
model (resume, ``load_task``). torch's float ``amount`` on a pruned tensor is a fraction of what remains, so each
step here prunes the exact number of weights that reaches the scheduled sparsity.

``pruning=heads`` -> :class:`HeadPruning`: after training, on the restored best checkpoint and before the test,
each head's importance is measured as Michel et al.'s (2019, arXiv 1905.10650) ``|dL/d gate_h|`` summed over
validation batches (the gate multiplies the head's output, at 1), and the ``amount`` least important heads are
removed per layer or globally (``HEAD_SCOPES``; per-layer L2-normalised scores for the global ranking, as in the
paper). The heads are physically removed (:meth:`CausalSelfAttention.keep_heads`), so the test and
``results.json`` see the smaller model, which is also saved as ``pruned_heads.ckpt``. With ``at=start`` the heads
are removed at setup instead, from weights loaded with ``init_from=`` (before fine-tuning them, or before
validating them in an evaluation-only run, ``trainer.max_steps=0``).

In an evaluation-only run :class:`MagnitudePruning` prunes to its ``sparsity`` at once, before validating.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, cast

import lightning as L
import torch
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune

from tiny_decoder.core.checks import check, check_int, check_number, is_count, is_number
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.core.registry import Registry
from tiny_decoder.model.attention import CausalSelfAttention
from tiny_decoder.model.transformer import DecoderTransformer


class ModelTask(Protocol):
    """What the pruning callbacks use of the LightningModule they prune (a task; ``training/`` knows no task)."""

    model: DecoderTransformer

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


log = logging.getLogger(__name__)

PRUNABLE = Registry("pruning.modules", group="pruning.modules")
SPARSITY_SCHEDULES = Registry("pruning.schedule", group="pruning.schedule")
PRUNING_SCOPES = Registry("pruning.scope", group="pruning.scope")
HEAD_SCOPES = Registry("pruning.scope", group="pruning.scope")
HEAD_PRUNING_TIMES = ("end", "start")  # after training, before the test | on the loaded weights, before training

Weight = tuple[nn.Module, str]

# --------------------------------------------------------------------------------------------------------
# Which weights are prunable
# --------------------------------------------------------------------------------------------------------


def _linears(module: nn.Module) -> list[Weight]:
    return [(m, "weight") for m in module.modules() if isinstance(m, nn.Linear)]


@PRUNABLE.register("linear")
def every_linear(model: DecoderTransformer) -> list[Weight]:
    """Every Linear weight (attention, feed-forward, head), except a head tied to the embedding."""
    tied = model.config.tie_embeddings
    return [(m, n) for m, n in _linears(model) if not (tied and m is model.head)]


@PRUNABLE.register("attention")
def attention_weights(model: DecoderTransformer) -> list[Weight]:
    return [w for block in model.layers for w in _linears(block.attn)]


@PRUNABLE.register("feedforward")
def feedforward_weights(model: DecoderTransformer) -> list[Weight]:
    return [w for block in model.layers for w in _linears(block.ff)]


@PRUNABLE.register("head")
def head_weight(model: DecoderTransformer) -> list[Weight]:
    if model.config.tie_embeddings:
        raise ConfigError("pruning.modules: 'head' is tied to the embedding (model.tie_embeddings=true); leave it out")
    return [(model.head, "weight")]


@PRUNABLE.register("embedding")
def embedding_table(model: DecoderTransformer) -> list[Weight]:
    return [(m, "weight") for m in model.embedding.modules() if isinstance(m, nn.Embedding)]


def prunable_weights(model: DecoderTransformer, modules: Sequence[str]) -> list[Weight]:
    """The ``(module, "weight")`` pairs the ``modules`` selectors pick, each once."""
    chosen: dict[int, Weight] = {}
    for name in modules:
        for weight in PRUNABLE.get(name)(model):
            chosen.setdefault(id(weight[0]), weight)
    if not chosen:
        raise ConfigError(f"pruning.modules={list(modules)} selects no weights in this model")
    return list(chosen.values())


def pruned_count(module: nn.Module, name: str) -> int:
    mask = getattr(module, f"{name}_mask", None)
    return 0 if mask is None else int((mask == 0).sum())


def current_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The weight the next forward uses (``module.weight`` of a pruned module is only refreshed by a forward)."""
    mask = getattr(module, f"{name}_mask", None)
    weight = getattr(module, f"{name}_orig") * mask if mask is not None else getattr(module, name)
    return weight.detach()


def sparsity(weights: Iterable[Weight]) -> float:
    """Fraction of the given weights that are pruned (masked to zero)."""
    weights = list(weights)
    total = sum(getattr(m, f"{n}_orig", getattr(m, n)).numel() for m, n in weights)
    return sum(pruned_count(m, n) for m, n in weights) / total


# --------------------------------------------------------------------------------------------------------
# Magnitude pruning during training
# --------------------------------------------------------------------------------------------------------


@SPARSITY_SCHEDULES.register("one_shot")
def one_shot(step: int, start: int, end: int) -> float:
    """All at once at ``start`` (``end`` unused)."""
    return 1.0 if step >= start else 0.0


@SPARSITY_SCHEDULES.register("gradual")
def gradual(step: int, start: int, end: int) -> float:
    """Zhu & Gupta (2017): ``1 - (1 - progress)^3`` from ``start`` to ``end`` (fast first, gentle at the end)."""
    if step < start:
        return 0.0
    progress = min(1.0, (step - start) / max(end - start, 1))
    return 1.0 - (1.0 - progress) ** 3


@SPARSITY_SCHEDULES.register("linear")
def linear(step: int, start: int, end: int) -> float:
    if step < start:
        return 0.0
    return min(1.0, (step - start) / max(end - start, 1))


def to_step(value: int | float, total_steps: int) -> int:
    """A schedule point: an int is a step, a float in [0, 1] that fraction of the run's ``total_steps``."""
    return value if isinstance(value, int) else round(value * total_steps)


def is_step_or_fraction(value: Any) -> bool:
    """What :func:`to_step` takes: an integer step >= 0 or a float fraction of the run in [0, 1]."""
    return is_count(value) or (is_number(value) and 0 <= value <= 1)


PRUNING_SCOPES.register("local")(lambda: False)  # value: use one global threshold?
PRUNING_SCOPES.register("global")(lambda: True)


class MagnitudePruning(ModelPruning):
    """L1 magnitude pruning to ``sparsity`` on a step schedule (module doc); logs ``prune/sparsity``.

    ``apply_pruning(amount)`` of the base class is reused with ``amount`` read as the target sparsity of the
    chosen weights, which the two ``_apply_*_pruning`` overrides turn into exact numbers of weights to prune.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        schedule: str = "gradual",
        start_step: int | float = 0.25,
        end_step: int | float = 0.75,
        every_n_steps: int = 100,
        modules: Sequence[str] = ("linear",),
        scope: str = "local",
        verbose: int = 0,
    ):
        check_number("pruning.sparsity", sparsity, 0, 1, high_open=True)
        for name, value in (("start_step", start_step), ("end_step", end_step)):
            check(f"pruning.{name}", value, is_step_or_fraction, "a step >= 0 or a fraction of the run in [0, 1]")
        check_int("pruning.every_n_steps", every_n_steps, 1)
        for name in modules:
            PRUNABLE.get(name)
        super().__init__(
            pruning_fn="l1_unstructured",
            parameter_names=["weight"],
            use_global_unstructured=PRUNING_SCOPES.get(scope)(),
            amount=sparsity,
            apply_pruning=False,  # not Lightning's per-epoch pruning: the step schedule below
            make_pruning_permanent=False,  # keep the masks (in checkpoints too)
            use_lottery_ticket_hypothesis=False,  # survivors keep their trained values
            verbose=verbose,
        )
        self.sparsity = float(sparsity)
        self.schedule = SPARSITY_SCHEDULES.get(schedule)
        self.start_step, self.end_step, self.every_n_steps = start_step, end_step, every_n_steps
        self.start, self.end = start_step, end_step  # made steps when the run's length is known (on_fit_start)
        self.modules = list(modules)
        self.reached = 0.0

    @property
    def pruned_parameters(self) -> list[Weight]:
        """The ``(module, "weight")`` pairs this callback prunes, chosen by ``modules`` at ``setup`` (empty
        before): what the sparsity targets and ``prune/sparsity`` refer to."""
        return list(self._parameters_to_prune)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._parameters_to_prune = prunable_weights(cast(ModelTask, pl_module).model, self.modules)
        if stage == "validate":  # an evaluation-only run (trainer.max_steps=0, init_from=...): prune at once
            self.apply_pruning(self.sparsity)
            self.reached = self.sparsity
            log.info("pruning=magnitude: %.1f%% of the chosen weights pruned before validating", 100 * self.sparsity)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = int(trainer.estimated_stepping_batches)
        self.start, self.end = to_step(self.start_step, total), to_step(self.end_step, total)
        last = self.start if self.schedule is one_shot else self.end
        fast_dev_run = getattr(trainer, "fast_dev_run", False)  # set by Lightning, not declared on Trainer
        if self.start > self.end or (last >= total and not fast_dev_run):  # debug=fast: never fires
            raise ConfigError(
                f"pruning: the schedule runs from step {self.start} to {last} but the run trains {total} steps; "
                "need start_step <= end_step < the run's steps (the pruned model needs steps to recover)"
            )
        self.reached = sparsity(self._parameters_to_prune)  # > 0 when resuming a pruned run

    def target(self, step: int) -> float:
        return self.sparsity * self.schedule(step, self.start, self.end)

    def is_due(self, step: int) -> bool:
        return step >= self.end or (step >= self.start and (step - self.start) % self.every_n_steps == 0)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps done so far
        target = self.target(step)
        if target > self.reached and self.is_due(step):
            self.apply_pruning(target)
            self.reached = target
        pl_module.log("prune/sparsity", self.reached)

    def _apply_local_pruning(self, amount: float) -> None:
        # local scope: Lightning's wrapped torch.nn.utils.prune.l1_unstructured (a pruning method only when global)
        prune_tensor: Callable[..., Any] = self.pruning_fn
        for module, name in self._parameters_to_prune:
            count = round(amount * current_weight(module, name).numel()) - pruned_count(module, name)
            scores = current_weight(module, name)
            prune_tensor(module, name=name, amount=max(count, 0), importance_scores=scores)

    def _apply_global_pruning(self, amount: float) -> None:
        weights = self._parameters_to_prune
        total = sum(current_weight(m, n).numel() for m, n in weights)
        count = round(amount * total) - sum(pruned_count(m, n) for m, n in weights)
        scores = {(m, n): current_weight(m, n) for m, n in weights}
        prune.global_unstructured(
            weights, pruning_method=self.pruning_fn, importance_scores=scores, amount=max(count, 0)
        )


# --------------------------------------------------------------------------------------------------------
# Structured attention-head pruning
# --------------------------------------------------------------------------------------------------------

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def attention_layers(model: DecoderTransformer) -> list[CausalSelfAttention]:
    return [block.attn for block in model.layers]


def head_importance(
    model: DecoderTransformer, loss_fn: LossFn, batches: Iterable[Mapping[str, Any]]
) -> list[torch.Tensor]:
    """Per layer, ``sum over batches |dL/d gate_h|`` at gates of 1 (Michel et al. 2019), in eval mode."""
    layers = attention_layers(model)
    gates = [torch.ones(a.n_heads, device=a.qkv.weight.device, requires_grad=True) for a in layers]
    scores = [torch.zeros(a.n_heads, device=a.qkv.weight.device) for a in layers]
    was_training = model.training
    model.eval()
    try:
        for attention, gate in zip(layers, gates, strict=True):
            attention.head_gate = gate
        for batch in batches:
            loss = loss_fn(model(batch["input"]), batch["target"])
            for score, grad in zip(scores, torch.autograd.grad(loss, gates), strict=True):
                score += grad.abs()
    finally:
        for attention in layers:
            attention.head_gate = None
        model.train(was_training)
    return [score.cpu() for score in scores]


@HEAD_SCOPES.register("layer")
def lowest_per_layer(importance: Sequence[torch.Tensor], amount: int) -> list[list[int]]:
    """Remove the ``amount`` least important heads of every layer; returns the heads each layer keeps."""
    if any(amount >= len(scores) for scores in importance):
        raise ConfigError(f"pruning.amount={amount} heads per layer would leave a layer without heads")
    return [sorted(scores.argsort(descending=True)[: len(scores) - amount].tolist()) for scores in importance]


@HEAD_SCOPES.register("global")
def lowest_globally(importance: Sequence[torch.Tensor], amount: int) -> list[list[int]]:
    """Remove the ``amount`` least important heads of the whole model, never a layer's last head."""
    keep = [set(range(len(scores))) for scores in importance]
    ranked = sorted((float(s), layer, head) for layer, scores in enumerate(importance) for head, s in enumerate(scores))
    removed = 0
    for _, layer, head in ranked:
        if removed == amount:
            break
        if len(keep[layer]) > 1:
            keep[layer].discard(head)
            removed += 1
    if removed < amount:
        raise ConfigError(f"pruning.amount={amount}: the model has only {removed} heads to spare (one per layer stays)")
    return [sorted(heads) for heads in keep]


def normalize_per_layer(importance: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's scores divided by their L2 norm (Michel et al.'s normalisation for global ranking)."""
    return [scores / scores.norm().clamp_min(1e-12) for scores in importance]


def gate_heads(model: DecoderTransformer, keep: Sequence[Sequence[int]]) -> None:
    """Mask (not remove) every head outside ``keep``: a 0/1 ``head_gate`` per layer (the masked reference)."""
    for attention, heads in zip(attention_layers(model), keep, strict=True):
        gate = torch.zeros(attention.n_heads, device=attention.qkv.weight.device)
        gate[list(heads)] = 1.0
        attention.head_gate = gate


def prune_heads(model: DecoderTransformer, keep: Sequence[Sequence[int]]) -> None:
    """Physically remove every head outside ``keep`` (one list of head indices per layer)."""
    for attention, heads in zip(attention_layers(model), keep, strict=True):
        if len(heads) < attention.n_heads:
            attention.keep_heads(heads)


def heads_to_keep(importance: Sequence[torch.Tensor], amount: int, scope: str, normalize: bool) -> list[list[int]]:
    scores = normalize_per_layer(importance) if normalize else list(importance)
    return HEAD_SCOPES.get(scope)(scores, amount)


class HeadPruning(L.Callback):
    """Before the test (the best checkpoint restored), remove the ``amount`` least important heads."""

    def __init__(
        self,
        amount: int = 4,
        scope: str = "global",
        normalize: bool = True,
        batches: int = 8,
        dirpath: str | None = None,
        at: str = "end",
    ):
        check_int("pruning.amount (heads to remove)", amount, 0)
        HEAD_SCOPES.get(scope)
        check("pruning.at", at, lambda v: v in HEAD_PRUNING_TIMES, f"one of {', '.join(HEAD_PRUNING_TIMES)}")
        self.amount, self.scope, self.normalize, self.batches, self.dirpath = amount, scope, normalize, batches, dirpath
        self.at = at
        self.kept: list[list[int]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if cast(ModelTask, pl_module).model.config.positional["name"] == "alibi":
            raise ConfigError("pruning=heads cannot be combined with positional=alibi (its slopes are per head)")
        if self.at == "start" and self.kept is None and stage in ("fit", "validate"):
            self.prune(trainer, pl_module)  # before the optimizer is built: it holds the smaller projections

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at == "end":
            self.prune(trainer, pl_module)

    def prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the heads on validation batches and remove the ``amount`` least important ones."""
        task = cast(ModelTask, pl_module)
        model = task.model
        before = model.num_parameters()
        with torch.inference_mode(False), torch.enable_grad():  # the test loop runs in inference mode
            batches = (move_data_to_device(b, pl_module.device) for b in self._validation_batches(trainer))
            importance = head_importance(model, task.loss, batches)
            self.kept = heads_to_keep(importance, self.amount, self.scope, self.normalize)
            prune_heads(model, self.kept)
        log.info(
            "pruning=heads: kept heads %s (importance %s); parameters %d -> %d",
            self.kept,
            [[round(float(s), 4) for s in layer] for layer in importance],
            before,
            model.num_parameters(),
        )
        if self.dirpath and self.at == "end":
            trainer.save_checkpoint(Path(self.dirpath) / "pruned_heads.ckpt", weights_only=True)

    def _validation_batches(self, trainer: L.Trainer) -> Iterator[Any]:
        datamodule = getattr(trainer, "datamodule", None)  # set by Lightning, not declared on Trainer
        assert datamodule is not None, "pruning=heads scores the heads on the data module's validation batches"
        return islice(iter(datamodule.val_dataloader()), self.batches)


# --------------------------------------------------------------------------------------------------------
# Loading pruned checkpoints
# --------------------------------------------------------------------------------------------------------


def conform_to_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Shape ``module`` like the one that wrote ``state_dict`` so it loads: fewer heads in head-pruned attention
    layers, and the ``<name>_orig`` / ``<name>_mask`` reparametrisation of magnitude-pruned weights."""
    _conform_heads(module, state_dict)
    _conform_masks(module, state_dict)


def _conform_heads(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    for name, attention in module.named_modules():
        if not isinstance(attention, CausalSelfAttention):
            continue
        prefix = f"{name}.qkv." if name else "qkv."
        weight = state_dict.get(prefix + "weight", state_dict.get(prefix + "weight_orig"))
        if weight is not None and weight.shape[0] != 3 * attention.inner_dim:
            attention.keep_heads(range(weight.shape[0] // (3 * attention.head_dim)))


def _conform_masks(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    for key, mask in state_dict.items():
        base = key.removesuffix("_mask")
        if base == key or f"{base}_orig" not in state_dict:
            continue
        path, _, name = base.rpartition(".")
        owner = module.get_submodule(path)
        if not hasattr(owner, f"{name}_mask"):
            prune.custom_from_mask(owner, name, mask.to(getattr(owner, name).device))
