"""How much memory one training step takes, from the config alone, and what a run does about it before training.

The estimate (:func:`estimate_memory`; the ``estimate`` tool prints it) is the peak of one AdamW step at the
configured batch, in the run's precision (``precision``, else ``trainer.precision``, else 32-true), as the sum of:

- weights, gradients and AdamW's two moments: 4 copies of the parameters in the weights' dtype (parameters
  counted on PyTorch's ``meta`` device: exact, nothing allocated);
- the activations autograd keeps for the backward pass, per layer and token (counted from the modules'
  code and checked against ``torch.autograd.graph.saved_tensors_hooks`` on the recipes): both norms' inputs and
  outputs (``4 d``; fp32 under autocast, which runs norms in fp32), q, k, v, the attention output and the output
  projection's input (``5 d``; ``+ 2 d`` for the rotated q and k under RoPE), the feed-forward's hidden
  activations (GELU: the first matmul's output and the activation, ``2 d_ff``; SwiGLU: both gates, the SiLU and
  the product, ``4 hidden``), the two residual dropouts' masks (``2 d``, kept as full tensors) when
  ``model.dropout`` > 0,
  and the attention weights where the attention keeps them (``standard``: ``h * T`` weights, plus the dropout mask
  and the dropped weights with attention dropout; ``sdpa``'s fused kernels and its chunked CPU dropout path keep
  none);
- the loss: the logits' log-softmax, its gradient and the logits' gradient, three fp32 copies of the
  ``b * T * vocab`` logits (plus the 16-bit logits under autocast);
- the framework: the resident memory of a CPU training process before its first step (Python, torch, Lightning,
  Hydra), :data:`FRAMEWORK_BYTES`, plus :data:`TEXT_DATA_BYTES` for the text data modules (``datasets``' Arrow
  tables, ``tokenizers``), measured on the project's 2-core machine; counted on a CPU only (on a GPU it is host
  memory, not the device's).

``benchmarks/memory.py`` compares this total with the measured peak RSS of one ``debug=fast`` batch of every
recipe. Before training, :func:`check_budget` warns when the estimate exceeds ``budget_gb`` (null: this machine's
available RAM, or the GPU's memory), and :func:`shrink_batch` halves ``data.batch_size`` until the estimate
fits ``shrink_batch_to_gb`` (``debug=fast`` sets 3.7 GiB, i.e. 4 GB, so a smoke check fits a small machine),
saying so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.model.feedforward import swiglu_hidden_size
from tiny_decoder.model.norm import PLACEMENTS

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 2**20
DEFAULT_PRECISION = "32-true"  # Lightning's default, and the trainer preset's
# resident memory of a CPU training process before its first step: the sequence recipes' one-batch peak
# (463-501 MiB for models of a few thousand parameters) on the project's 2-core machine, torch 2.x, Lightning 2.x
FRAMEWORK_BYTES = 480 * MIB
# what the text data modules add (Arrow tables, tokenizer): stories_tiny at batch 1 peaks at 663 MiB
TEXT_DATA_BYTES = 160 * MIB
TEXT_DATA_MODULE = "tiny_decoder.data.text.TextDataModule"


@dataclass(frozen=True)
class Precision:
    """A Lightning precision: the dtype of the weights (also of the gradients and of each AdamW moment) and
    of the activations kept for the backward pass."""

    name: str
    weight_dtype: str
    activation_dtype: str

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def activation_bytes(self) -> int:
        return DTYPE_BYTES[self.activation_dtype]

    @property
    def autocast(self) -> bool:
        """Mixed precision: fp32 weights, 16-bit matmul outputs (norms and softmax stay fp32)."""
        return self.weight_dtype != self.activation_dtype


DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
# Lightning's precision values (its legacy spellings too) -> (weight dtype, activation dtype); Transformer
# Engine's fp8 matmuls keep fp32 master weights and are counted as fp16 mixed precision (an upper bound).
PRECISION_DTYPES = {
    "64-true": ("fp64", "fp64"), "64": ("fp64", "fp64"),
    "32-true": ("fp32", "fp32"), "32": ("fp32", "fp32"),
    "16-mixed": ("fp32", "fp16"), "16": ("fp32", "fp16"), "bf16-mixed": ("fp32", "bf16"), "bf16": ("fp32", "bf16"),
    "16-true": ("fp16", "fp16"), "bf16-true": ("bf16", "bf16"),
    "transformer-engine": ("fp32", "fp16"), "transformer-engine-float16": ("fp32", "fp16"),
}  # fmt: skip


def precision(name: str) -> Precision:
    """The :class:`Precision` of a Lightning precision value (``32-true``, ``bf16-mixed``, ...)."""
    if name not in PRECISION_DTYPES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {name!r}")
    return Precision(name, *PRECISION_DTYPES[name])


def precision_of(cfg: DictConfig) -> Precision:
    """The run's precision: the ``precision`` shortcut, else ``trainer.precision``, else 32-true."""
    value = cfg.get("precision")
    if value is None:
        value = OmegaConf.select(cfg, "trainer.precision", default=None)
    return precision(DEFAULT_PRECISION if value is None else str(value))


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm_parameters(config: ModelConfig) -> int:
    norm = config.norm
    if not PLACEMENTS.get(norm["placement"]).uses_norm or not norm.get("affine", True):
        return 0
    per_feature = {"layernorm": 2, "rmsnorm": 1}[norm.get("kind", "layernorm")]
    return per_feature * config.d_model


def _feedforward_parameters(config: ModelConfig) -> int:
    d, b = config.d_model, config.bias
    if config.activation["name"] == "swiglu":
        hidden = swiglu_hidden_size(config.d_ff, config.activation.get("multiple_of", 1))
        return 2 * _linear(d, hidden, b) + _linear(hidden, d, b)
    return _linear(d, config.d_ff, b) + _linear(config.d_ff, d, b)


def _input_parameters(config: ModelConfig) -> int:
    d = config.d_model
    scalar_feature = 0 if d == 2 else _linear(1, d, True)
    embedding = {"token": config.vocab_size * d, "numeric": scalar_feature}[config.embedding["name"]]
    positional = {"learned": config.context_length * d, "numeric": scalar_feature}.get(config.positional["name"], 0)
    return embedding + positional


def analytic_parameter_count(config: ModelConfig) -> int:
    """Parameters from the config alone (standard attention projections; extra attention parameters such as
    Linformer's projections are not included)."""
    d, b = config.d_model, config.bias
    attention = _linear(d, 3 * d, b) + _linear(d, d, b)
    per_layer = attention + _feedforward_parameters(config) + 2 * _norm_parameters(config)
    final_norm = _norm_parameters(config) if PLACEMENTS.get(config.norm["placement"]).final_norm else 0
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return _input_parameters(config) + config.n_layers * per_layer + final_norm + head


def exact_parameter_count(config: ModelConfig) -> int:
    """Parameters of the real module tree, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return DecoderTransformer(config).num_parameters()


@dataclass
class MemoryEstimate:
    parameters: int
    analytic_parameters: int
    precision: Precision
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # what the layers keep for the backward pass (module doc)
    loss_bytes: int = 0  # the logits' log-softmax and gradients (module doc)
    framework_bytes: int = 0  # the CPU process before its first step (FRAMEWORK_BYTES), 0 on a GPU

    @property
    def step_bytes(self) -> int:
        """The training step alone: weights, gradients, AdamW state, activations, loss."""
        return (
            self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes + self.loss_bytes
        )

    @property
    def total_bytes(self) -> int:
        return self.step_bytes + self.framework_bytes

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


def _weight_keys(config: ModelConfig) -> int:
    """Keys whose attention weights each query's softmax keeps for the backward pass (0: none kept)."""
    attention = config.attention
    name = attention["name"]
    if name == "sdpa":
        return 0  # fused kernels keep the log-sum-exp only; CPU dropout runs in recomputed chunks
    t = config.context_length
    if name == "longformer" and attention.get("implementation", "banded") == "banded":
        return min(t, int(attention.get("window", t)) + int(attention.get("n_global", 0)))
    if name == "linformer":  # k summaries of the past plus the current block's keys
        k = int(attention.get("k", 0))
        return min(t, k + int(attention.get("block_size") or k))
    return config.context_length  # standard, masked longformer: the full (T, T) weights


def layer_bytes_per_token(config: ModelConfig, numerics: Precision) -> float:
    """Bytes one layer keeps for the backward pass per token (module doc)."""
    d, a = config.d_model, numerics.activation_bytes
    wide = max(4, a) if numerics.autocast else a  # autocast runs norms (and softmax) in fp32
    norms = 4 * d * wide if PLACEMENTS.get(config.norm["placement"]).uses_norm else 0
    rotary = 2 * d if config.positional["name"] == "rope" else 0
    attention = (5 * d + rotary) * a
    if config.activation["name"] == "swiglu":
        feedforward = 4 * swiglu_hidden_size(config.d_ff, config.activation.get("multiple_of", 1)) * a
    else:
        feedforward = 2 * config.d_ff * a
    dropout_masks = 2 * d * a if config.dropout > 0 else 0  # CPU dropout keeps its scaled noise, a full tensor
    attention_dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
    weights = config.n_heads * _weight_keys(config)
    kept_weights = weights * (wide + (2 * a if attention_dropout > 0 else 0))  # + CPU dropout noise, dropped weights
    return norms + attention + feedforward + dropout_masks + kept_weights


def activation_bytes(config: ModelConfig, batch_size: int, numerics: Precision) -> int:
    """Activations one training step keeps for its backward pass: every layer's (module doc)."""
    tokens = batch_size * config.context_length
    return int(config.n_layers * tokens * layer_bytes_per_token(config, numerics))


def loss_bytes(config: ModelConfig, batch_size: int, numerics: Precision) -> int:
    """The cross-entropy's peak (module doc): three fp32 (fp64 in 64-true) copies of the logits, plus the
    16-bit logits under autocast or half precision."""
    elements = batch_size * config.context_length * config.vocab_size
    a = numerics.activation_bytes
    return elements * (3 * max(4, a) + (a if a < 4 else 0))


def estimate_memory(
    config: ModelConfig, batch_size: int, numerics: Precision | None = None, framework_bytes: int = 0
) -> MemoryEstimate:
    """Peak memory of one AdamW training step at ``batch_size`` sequences of ``context_length`` tokens in
    ``numerics`` (default 32-true), plus ``framework_bytes`` (:func:`framework_bytes_of`)."""
    numerics = numerics or precision(DEFAULT_PRECISION)
    parameters = exact_parameter_count(config)
    weights = parameters * numerics.weight_bytes
    return MemoryEstimate(
        parameters=parameters,
        analytic_parameters=analytic_parameter_count(config),
        precision=numerics,
        parameter_bytes=weights,
        gradient_bytes=weights,
        optimizer_bytes=2 * weights,  # AdamW: two moments per parameter, in the parameters' dtype
        activation_bytes=activation_bytes(config, batch_size, numerics),
        loss_bytes=loss_bytes(config, batch_size, numerics),
        framework_bytes=framework_bytes,
    )


def framework_bytes_of(cfg: DictConfig) -> int:
    """The process's own memory the run's estimate adds (module doc): 0 on a GPU."""
    if on_gpu(cfg):
        return 0
    text = OmegaConf.select(cfg, "data._target_", default=None) == TEXT_DATA_MODULE
    return FRAMEWORK_BYTES + (TEXT_DATA_BYTES if text else 0)


def estimate_run(cfg: DictConfig, config: ModelConfig) -> MemoryEstimate:
    """The estimate of the run ``cfg`` describes: its batch, precision and device."""
    return estimate_memory(config, int(cfg.data.batch_size), precision_of(cfg), framework_bytes_of(cfg))


def on_gpu(cfg: DictConfig) -> bool:
    """The run trains on a CUDA / ROCm GPU (``trainer.accelerator`` gpu / cuda, or auto with one present)."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def available_bytes(gpu: bool) -> int:
    """The memory a step may take here: the GPU's total memory, else the RAM the kernel reports available
    (``MemAvailable``), else all physical RAM."""
    if gpu and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[1])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(cfg: DictConfig, gpu: bool) -> tuple[int, str]:
    """``budget_gb`` in bytes and how to name it (null: :func:`available_bytes`); its range is checked with the
    other fields' (``run/config_checks.py``)."""
    value = cfg.get("budget_gb")
    if value is None:
        where, available = ("the GPU's memory" if gpu else "the available RAM"), available_bytes(gpu)
        return available, f"{where}, {available / GIB:.1f} GiB (budget_gb=null)"
    return int(float(value) * GIB), f"budget_gb={float(value):g} GiB"


REDUCE_HINT = "reduce data.batch_size, use precision=bf16-mixed, or shorten data.context_length"


def check_budget(cfg: DictConfig, config: ModelConfig) -> MemoryEstimate:
    """Log one warning line before training when the step's estimated peak exceeds the budget (module doc)."""
    estimate = estimate_run(cfg, config)
    budget, name = budget_bytes(cfg, on_gpu(cfg))
    if estimate.total_bytes > budget:
        log.warning(
            "estimated peak memory %.1f GiB (batch %d, %s) exceeds %s: %s (python -m tiny_decoder.estimate "
            "shows the parts)",
            estimate.total_gib, int(cfg.data.batch_size), estimate.precision.name, name, REDUCE_HINT,
        )  # fmt: skip
    return estimate


def shrink_batch(cfg: DictConfig, config: ModelConfig) -> int:
    """Under ``shrink_batch_to_gb``, halve ``data.batch_size`` (in ``cfg``) until the estimate fits it, and log
    the change; returns the batch size."""
    limit = cfg.get("shrink_batch_to_gb")
    batch = int(OmegaConf.select(cfg, "data.batch_size", default=0) or 0)
    if limit is None or batch <= 1:
        return batch
    numerics, framework = precision_of(cfg), framework_bytes_of(cfg)

    def gib(size: int) -> float:
        return estimate_memory(config, size, numerics, framework).total_gib

    original, size = gib(batch), batch
    while size > 1 and gib(size) > float(limit):
        size //= 2
    if size != batch:
        log.warning(
            "data.batch_size %d -> %d so that one step fits shrink_batch_to_gb=%g (estimated %.1f -> %.1f GiB; "
            "debug=fast sets it): shrink_batch_to_gb=null keeps the recipe's batch",
            batch, size, float(limit), original, gib(size),
        )  # fmt: skip
        with open_dict(cfg):
            cfg.data.batch_size = size
    return size


def plan_memory(cfg: DictConfig, model_config: dict[str, Any], datamodule: Any = None) -> MemoryEstimate:
    """A run's memory handling before training (``build_run``): shrink the batch if asked (in ``cfg`` and the
    ``datamodule``), then warn over budget."""
    config = ModelConfig.from_dict(model_config)
    size = shrink_batch(cfg, config)
    if datamodule is not None and getattr(datamodule, "batch_size", size) != size:
        datamodule.batch_size = size
        if "batch_size" in getattr(datamodule, "hparams", {}):
            datamodule.hparams.batch_size = size
    return check_budget(cfg, config)
