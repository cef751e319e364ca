"""``python -m tiny_decoder.estimate +experiment=NAME [budget_gb=8]``: will a recipe fit in memory?

Counts parameters two ways, analytically from the config (the design card's "Memory Estimation") and by
building the model on PyTorch's ``meta`` device (exact, allocates nothing), then estimates training memory
for the configured batch: parameters, gradients, AdamW state, and activations, both with the card's
formula and with the per-layer formula of Korthikanti et al. 2022 (arXiv 2205.05198), and says whether
the total fits a budget (default 8 GB, the card's AMD RX 6600).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from tiny_decoder.cli import hydra_tool
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.model.feedforward import swiglu_hidden_size
from tiny_decoder.model.norm import PLACEMENTS
from tiny_decoder.run.config_checks import build_model_config

GIB = 1024**3
BYTES_FP32 = 4


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
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes_card: int
    activation_bytes_detailed: int

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes_detailed


def estimate_memory(config: ModelConfig, batch_size: int) -> MemoryEstimate:
    """Training memory for one fp32 step at ``batch_size`` sequences of ``context_length`` tokens."""
    parameters = exact_parameter_count(config)
    d, t, h, layers = config.d_model, config.context_length, config.n_heads, config.n_layers
    # The card: per layer 2 * (d * heads * T * 4 B) + d_ff * T * 4 B, times batch, times 3 for backprop.
    card_per_layer = 2 * (d * h * t * BYTES_FP32) + config.d_ff * t * BYTES_FP32
    card = 3 * layers * card_per_layer * batch_size
    # Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit; doubled for fp32; plus the logits.
    detailed_per_layer = t * batch_size * d * (34 + 5 * h * t / d) * 2
    logits = batch_size * t * config.vocab_size * BYTES_FP32 * 2
    detailed = int(layers * detailed_per_layer + logits)
    return MemoryEstimate(
        parameters=parameters,
        analytic_parameters=analytic_parameter_count(config),
        parameter_bytes=parameters * BYTES_FP32,
        gradient_bytes=parameters * BYTES_FP32,
        optimizer_bytes=2 * parameters * BYTES_FP32,
        activation_bytes_card=card,
        activation_bytes_detailed=detailed,
    )


def render(estimate: MemoryEstimate, batch_size: int, budget_gb: float) -> Table:
    table = Table(title=f"training memory estimate (fp32, AdamW, batch {batch_size})")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("parameters (exact, meta device)", f"{estimate.parameters:,}")
    table.add_row("parameters (analytic, card)", f"{estimate.analytic_parameters:,}")
    for name in ("parameter", "gradient", "optimizer"):
        table.add_row(f"{name} memory", f"{getattr(estimate, f'{name}_bytes') / 2**20:,.2f} MiB")
    table.add_row("activations (card formula)", f"{estimate.activation_bytes_card / 2**20:,.2f} MiB")
    table.add_row("activations (Korthikanti et al.)", f"{estimate.activation_bytes_detailed / 2**20:,.2f} MiB")
    table.add_row("total", f"{estimate.total_bytes / 2**20:,.2f} MiB")
    verdict = "fits" if estimate.total_bytes <= budget_gb * GIB else "does NOT fit"
    table.add_row(f"budget {budget_gb:g} GiB", verdict)
    return table


def run_estimate(cfg: DictConfig) -> MemoryEstimate:
    datamodule = instantiate(cfg.data, _convert_="all")
    config = ModelConfig.from_dict(build_model_config(cfg, datamodule))
    batch_size = int(cfg.data.batch_size)
    estimate = estimate_memory(config, batch_size)
    Console().print(render(estimate, batch_size, float(cfg.budget_gb)))
    return estimate


main = hydra_tool("estimate", run_estimate)

if __name__ == "__main__":
    main()
