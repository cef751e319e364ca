"""``python -m tiny_decoder.estimate +experiment=NAME [budget_gb=8]``: will a recipe fit in memory?

Counts parameters two ways, analytically from the config (the design card's "Memory Estimation") and by
building the model on PyTorch's ``meta`` device (exact, allocates nothing), then estimates the training memory
of one step at the configured batch, in the run's precision (``precision``, else ``trainer.precision``, else
32-true): weights, gradients and AdamW's two moments, and the activations kept for the backward pass, and says
whether the total fits a budget (default 8 GiB, the card's AMD RX 6600).

Activations: per layer ``b * T * (34 * d + 5 * h * T) * A / 2`` bytes, Korthikanti et al. 2022 (arXiv
2205.05198: ``s*b*h*(34 + 5*a*s/h)`` bytes a layer with 16-bit activations), for batch ``b``, context ``T``, width
``d``, ``h`` heads and ``A`` bytes per activation element; plus the logits and their gradient,
``2 * b * T * vocab * A``. Bytes per element by precision: 32-true keeps everything in fp32 (4); ``*-mixed``
(autocast) keeps fp32 weights, gradients and AdamW state (4) but holds the activations in 16 bits (2);
``*-true`` half precision has 2 for both, 64-true 8. Not counted: autocast's 16-bit copies of the weights
(2 B a parameter during the step), the framework's workspace and the allocator's fragmentation. The design
card's own activation formula is not used: it leaves out the T x T attention scores and the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from tiny_decoder.cli import hydra_tool
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.model.feedforward import swiglu_hidden_size
from tiny_decoder.model.norm import PLACEMENTS
from tiny_decoder.run.config_checks import build_model_config

GIB = 1024**3
MIB = 2**20
DEFAULT_PRECISION = "32-true"  # Lightning's default, and the trainer preset's


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
    activation_bytes: int  # Korthikanti et al. 2022 per layer, plus the logits (module doc)

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes


def activation_bytes(config: ModelConfig, batch_size: int, bytes_per_activation: int) -> int:
    """Activations one training step keeps for its backward pass (module doc): every layer's, Korthikanti et al.
    2022 scaled from 16-bit to ``bytes_per_activation``, plus the logits and their gradient."""
    b, t, d, h = batch_size, config.context_length, config.d_model, config.n_heads
    per_layer = b * t * (34 * d + 5 * h * t) * bytes_per_activation // 2
    logits = 2 * b * t * config.vocab_size * bytes_per_activation
    return config.n_layers * per_layer + logits


def estimate_memory(config: ModelConfig, batch_size: int, numerics: Precision | None = None) -> MemoryEstimate:
    """Training memory of one AdamW step at ``batch_size`` sequences of ``context_length`` tokens in
    ``numerics`` (default 32-true)."""
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
        activation_bytes=activation_bytes(config, batch_size, numerics.activation_bytes),
    )


def mib(n_bytes: int) -> str:
    return f"{n_bytes / MIB:,.2f} MiB"


def render(estimate: MemoryEstimate, batch_size: int, budget_gb: float) -> Table:
    numerics = estimate.precision
    weights = f"{numerics.weight_dtype}, {numerics.weight_bytes} B each"
    table = Table(title=f"training memory ({numerics.name}, AdamW, batch {batch_size})")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("parameters (exact, meta device)", f"{estimate.parameters:,}")
    table.add_row("parameters (analytic, card)", f"{estimate.analytic_parameters:,}")
    table.add_row(f"weights ({weights})", mib(estimate.parameter_bytes))
    table.add_row(f"gradients ({weights})", mib(estimate.gradient_bytes))
    table.add_row(f"AdamW state (2 moments, {weights})", mib(estimate.optimizer_bytes))
    activations = f"{numerics.activation_dtype}, {numerics.activation_bytes} B each"
    table.add_row(f"activations ({activations})*", mib(estimate.activation_bytes))
    table.add_row("total", mib(estimate.total_bytes))
    verdict = "fits" if estimate.total_bytes <= budget_gb * GIB else "does NOT fit"
    table.add_row(f"budget {budget_gb:g} GiB", verdict)
    return table


def activation_note(numerics: Precision) -> str:
    """The formula of the activation row, with this precision's bytes per element."""
    a = numerics.activation_bytes
    return (
        f"* Korthikanti et al. 2022: b*T*(34*d + 5*h*T)*{a}/2 bytes per layer, plus the logits and their gradient,"
        f" 2*b*T*vocab*{a} bytes (b batch, T context, d width, h heads; {a} B per {numerics.activation_dtype} value)"
    )


def run_estimate(cfg: DictConfig) -> MemoryEstimate:
    datamodule = instantiate(cfg.data, _convert_="all")
    config = ModelConfig.from_dict(build_model_config(cfg, datamodule))
    batch_size = int(cfg.data.batch_size)
    estimate = estimate_memory(config, batch_size, precision_of(cfg))
    console = Console()
    console.print(render(estimate, batch_size, float(cfg.budget_gb)))
    console.print(activation_note(estimate.precision), highlight=False)
    return estimate


main = hydra_tool("estimate", run_estimate)

if __name__ == "__main__":
    main()
