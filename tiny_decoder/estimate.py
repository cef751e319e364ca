"""``python -m tiny_decoder.estimate +experiment=NAME [budget_gb=8]``: will a recipe fit in memory?

Counts parameters two ways, analytically from the config (the design card's "Memory Estimation") and by
building the model on PyTorch's ``meta`` device (exact, allocates nothing), then estimates the peak memory of
one training step at the configured batch, in the run's precision (``precision``, else ``trainer.precision``,
else 32-true): weights, gradients and AdamW's two moments, the activations the layers keep for the backward
pass, the loss's copies of the logits and, on a CPU, the process's own memory (the framework); and says whether
the total fits a budget (default 8 GiB, the card's AMD RX 6600). What each row counts:
``tiny_decoder/run/memory.py`` (the same estimate warns before training when a run will not fit ``budget_gb``);
``benchmarks/memory.py`` compares it with the measured peak of every recipe. ``shrink_batch_to_gb`` (set by
``debug=fast``) shrinks the batch here as it does in training. Not counted: autocast's 16-bit copies of the
weights (2 B a parameter during the step), the backward pass's short-lived gradients and the allocator's
fragmentation. The design card's own activation formula is not used: it leaves out the logits, and Korthikanti
et al.'s (2022) counts the ``T x T`` attention scores that fused attention never keeps.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from tiny_decoder.cli import hydra_tool
from tiny_decoder.model import ModelConfig
from tiny_decoder.run.config_checks import build_model_config, validate_config
from tiny_decoder.run.memory import (
    GIB,
    MIB,
    MemoryEstimate,
    Precision,
    estimate_run,
    shrink_batch,
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
    activations = f"{numerics.activation_dtype}" + (", norms in fp32" if numerics.autocast else "")
    table.add_row(f"activations kept for backward ({activations})*", mib(estimate.activation_bytes))
    table.add_row("loss (log-softmax + 2 gradients of the logits, fp32)", mib(estimate.loss_bytes))
    table.add_row("training step", mib(estimate.step_bytes))
    if estimate.framework_bytes:
        table.add_row("framework (the CPU process before its first step)", mib(estimate.framework_bytes))
    table.add_row("total (peak)", mib(estimate.total_bytes))
    verdict = "fits" if estimate.total_bytes <= budget_gb * GIB else "does NOT fit"
    table.add_row(f"budget {budget_gb:g} GiB", verdict)
    return table


def activation_note(numerics: Precision) -> str:
    """What the activation row counts, with this precision's bytes per element."""
    a = numerics.activation_bytes
    return (
        f"* per layer and token: norms 4*d, q/k/v/attention output/projection input 5*d (+2*d with RoPE), the "
        f"feed-forward's hidden values (GELU 2*d_ff, SwiGLU 4*hidden), at {a} B per {numerics.activation_dtype} "
        "value; the residual dropouts' 2*d masks; standard attention's h*T weights (sdpa keeps none)"
    )


def run_estimate(cfg: DictConfig) -> MemoryEstimate:
    validate_config(cfg)  # budget_gb, shrink_batch_to_gb, precision: the training tool's range checks
    datamodule = instantiate(cfg.data, _convert_="all")
    config = ModelConfig.from_dict(build_model_config(cfg, datamodule))
    shrink_batch(cfg, config)
    estimate = estimate_run(cfg, config)
    console = Console()
    console.print(render(estimate, int(cfg.data.batch_size), float(cfg.budget_gb)))
    console.print(activation_note(estimate.precision), highlight=False)
    return estimate


main = hydra_tool("estimate", run_estimate)

if __name__ == "__main__":
    main()
