"""The memory estimate: the analytic parameter count equals the real model's, memory figures by hand in each
precision, the precision taken from the run's config, and the table of the real command."""

from __future__ import annotations

import itertools
import re

import pytest

from tests.helpers import run_module
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.estimate import run_estimate
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.run.memory import (
    analytic_parameter_count,
    estimate_memory,
    exact_parameter_count,
    precision,
    precision_of,
)

NORMS = [
    {"placement": "pre", "kind": "layernorm"},
    {"placement": "post", "kind": "rmsnorm"},
    {"placement": "none", "kind": "layernorm"},
]


@pytest.mark.parametrize(
    ("activation", "norm", "positional", "embedding"),
    list(
        itertools.product(["gelu", "swiglu"], NORMS, ["learned", "numeric", "rope", "sinusoidal"], ["token", "numeric"])
    ),
)
def test_analytic_count_equals_real_model(activation: str, norm: dict, positional: str, embedding: str):
    config = ModelConfig(
        vocab_size=256,
        context_length=8,
        d_model=24,
        n_layers=2,
        n_heads=4,
        d_ff=72,
        activation={"name": activation},
        norm=norm,
        positional={"name": positional},
        embedding={"name": embedding},
    )
    real = DecoderTransformer(config).num_parameters()
    assert analytic_parameter_count(config) == real
    assert exact_parameter_count(config) == real


def test_card_model_and_tied_embeddings():
    card = ModelConfig(
        d_model=2,
        n_heads=2,
        n_layers=3,
        d_ff=32,
        embedding={"name": "numeric"},
        positional={"name": "numeric"},
        norm={"placement": "post", "kind": "layernorm"},
    )
    assert analytic_parameter_count(card) == DecoderTransformer(card).num_parameters() == 1094
    tied = ModelConfig(vocab_size=512, d_model=32, n_heads=4, tie_embeddings=True)
    assert analytic_parameter_count(tied) == DecoderTransformer(tied).num_parameters()


# vocab 256, context T 8, width d 64, 3 layers, h 4 heads, d_ff 256; pre-LayerNorm, GELU, learned positions, biases
SMALL = {"vocab_size": 256, "context_length": 8, "d_model": 64, "n_layers": 3, "n_heads": 4, "d_ff": 256}
# token table 256*64 + positions 8*64 + 3 layers * (qkv 64*192+192 + out 64*64+64 + ffn 64*256+256 + 256*64+64
# + 2 norms 2*2*64) + final norm 2*64 + head 256*64 = 16,384 + 512 + 3 * 49,984 + 128 + 16,384
SMALL_PARAMETERS = 183_360
# what one layer keeps per token (tiny_decoder/run/memory.py), pre-LayerNorm, GELU, sdpa, no dropout: both norms'
# inputs and outputs 4*d, q/k/v/attention output/projection input 5*d, GELU's two d_ff-wide values 2*d_ff; tokens
# b*T = 32*8 = 256 over 3 layers; the loss's three fp32 copies of the b*T*vocab = 65,536 logits
SMALL_TOKENS_LAYERS, SMALL_LOGITS = 3 * 256, 65_536


def test_memory_figures_by_hand_in_fp32():
    estimate = estimate_memory(ModelConfig(**SMALL), batch_size=32)  # default: 32-true
    assert estimate.parameters == SMALL_PARAMETERS
    assert estimate.precision.name == "32-true"
    assert estimate.parameter_bytes == estimate.gradient_bytes == 4 * 183_360 == 733_440
    assert estimate.optimizer_bytes == 2 * 4 * 183_360 == 1_466_880  # AdamW: two fp32 moments
    # (4*64 + 5*64 + 2*256) * 4 B = 4,352 B a token and layer
    assert estimate.activation_bytes == SMALL_TOKENS_LAYERS * 4_352 == 3_342_336
    assert estimate.loss_bytes == SMALL_LOGITS * 3 * 4 == 786_432
    assert estimate.framework_bytes == 0  # the model alone; a run's estimate adds the process (tests/run)
    assert estimate.total_bytes == 733_440 * 4 + 3_342_336 + 786_432 == 7_062_528


def test_bf16_mixed_keeps_fp32_weights_state_and_norms_and_halves_the_matmul_outputs():
    estimate = estimate_memory(ModelConfig(**SMALL), batch_size=32, numerics=precision("bf16-mixed"))
    assert (estimate.precision.weight_dtype, estimate.precision.activation_dtype) == ("fp32", "bf16")
    assert estimate.parameter_bytes == estimate.gradient_bytes == 733_440  # fp32 master weights and gradients
    assert estimate.optimizer_bytes == 1_466_880
    # norms 4*64 * 4 B (autocast runs them in fp32) + (5*64 + 2*256) * 2 B = 2,688 B a token and layer
    assert estimate.activation_bytes == SMALL_TOKENS_LAYERS * 2_688 == 2_064_384
    assert estimate.loss_bytes == SMALL_LOGITS * (3 * 4 + 2) == 917_504  # plus the bf16 logits
    assert estimate.total_bytes == 2_933_760 + 2_064_384 + 917_504 == 5_915_648


def test_true_half_precision_halves_weights_state_and_activations():
    estimate = estimate_memory(ModelConfig(**SMALL), batch_size=32, numerics=precision("bf16-true"))
    assert estimate.parameter_bytes == 2 * 183_360 == 366_720
    # (4*64 + 5*64 + 2*256) * 2 B = 2,176 B a token and layer
    assert estimate.activation_bytes == SMALL_TOKENS_LAYERS * 2_176 == 1_671_168
    assert estimate.total_bytes == 4 * 366_720 + 1_671_168 + 917_504 == 4_055_552


def test_standard_attention_and_dropout_add_what_they_keep():
    """standard attention keeps its h*T softmax weights a token (fp32), plus the dropout noise and the dropped
    weights with attention dropout; residual dropout keeps two d-wide noise tensors."""
    base = estimate_memory(ModelConfig(**SMALL), batch_size=32).activation_bytes
    standard = {**SMALL, "attention": {"name": "standard"}}
    weights = SMALL_TOKENS_LAYERS * 4 * 8 * 4  # h=4 heads x T=8 keys x 4 B
    assert estimate_memory(ModelConfig(**standard), batch_size=32).activation_bytes == base + weights
    dropped = estimate_memory(ModelConfig(**standard, dropout=0.1), batch_size=32).activation_bytes
    assert dropped == base + weights * 3 + SMALL_TOKENS_LAYERS * 2 * 64 * 4
    sdpa_dropout = estimate_memory(ModelConfig(**SMALL, dropout=0.1), batch_size=32).activation_bytes
    assert sdpa_dropout == base + SMALL_TOKENS_LAYERS * 2 * 64 * 4  # sdpa keeps no weights, with dropout too


def test_the_precision_comes_from_the_run_config(compose_config):
    def name(*overrides: str) -> str:
        return precision_of(compose_config(*overrides, config_name="estimate")).name

    assert name("+experiment=stories15m") == "32-true"  # the trainer preset's
    assert name("+experiment=stories_tiny") == "bf16-mixed"  # the recipe sets trainer.precision
    assert name("+experiment=stories15m", "trainer.precision=16-mixed") == "16-mixed"
    assert name("+experiment=stories_tiny", "precision=32-true") == "32-true"  # the shortcut wins
    with pytest.raises(ConfigError, match="precision must be one of"):
        precision("fp8")


def test_cli_estimate_of_the_card_recipe(compose_config, capsys):
    cfg = compose_config("+experiment=sequence_seed", "budget_gb=8", config_name="estimate")
    estimate = run_estimate(cfg)
    out = capsys.readouterr().out
    assert estimate.parameters == 1094
    assert "1,094" in out and "fits" in out and "32-true" in out
    tiny_budget = compose_config("+experiment=sequence_strong", "budget_gb=0.0001", config_name="estimate")
    run_estimate(tiny_budget)
    assert "does NOT fit" in capsys.readouterr().out


def table_rows(out: str) -> dict[str, str]:
    """``item -> value`` of the rich table's body rows."""
    rows = (re.fullmatch(r"\s*│\s*(.*?)\s*│\s*(.*?)\s*│\s*", line) for line in out.splitlines())
    return {row[1]: row[2] for row in rows if row}


def mib(value: str) -> float:
    return float(value.removesuffix(" MiB").replace(",", ""))


def test_the_stories15m_table_totals_the_one_activation_figure_it_shows():
    """``python -m tiny_decoder.estimate +experiment=stories15m``: one activation row, in the total; by hand,
    b 128, T 256, d 288, 6 layers, SwiGLU hidden 768, RoPE, fp32: 6 * 128*256 * (4*288 + 7*288 + 4*768) * 4 B =
    4,907,335,680 B = 4,680.00 MiB; the loss 3 * 128*256*4096 * 4 B = 1,536 MiB; 16 B for each of the 7,155,360
    parameters (109.18 MiB); the CPU process 640 MiB (the framework and the text data)."""
    result = run_module("tiny_decoder.estimate", "+experiment=stories15m")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training memory (32-true, AdamW, batch 128)" in result.stdout
    rows = table_rows(result.stdout)
    activations = [item for item in rows if item.startswith("activations")]
    assert activations == ["activations kept for backward (fp32)*"]
    assert rows[activations[0]] == "4,680.00 MiB"
    assert rows["loss (log-softmax + 2 gradients of the logits, fp32)"] == "1,536.00 MiB"
    parts = [
        mib(rows[item]) for item in rows if item.startswith(("weights", "gradients", "AdamW", "activations", "loss"))
    ]
    assert mib(rows["training step"]) == pytest.approx(sum(parts), abs=0.02)
    if "framework (the CPU process before its first step)" in rows:  # no GPU here
        assert mib(rows["total (peak)"]) == pytest.approx(mib(rows["training step"]) + 640, abs=0.02)
    assert "per layer and token" in result.stdout
    parts = ["weights (fp32, 4 B each)", "gradients (fp32, 4 B each)", "AdamW state (2 moments, fp32, 4 B each)"]
    assert [rows[item] for item in parts] == ["27.30 MiB", "27.30 MiB", "54.59 MiB"]
    assert rows["training step"] == "6,325.18 MiB"  # (7,155,360 * 16 + 4,907,335,680 + 1,610,612,736) / 2**20
    assert rows["budget 8 GiB"] == "fits"


def test_a_bf16_mixed_run_is_estimated_with_bf16_activations(compose_config, capsys):
    cfg = compose_config("+experiment=stories15m", "precision=bf16-mixed", config_name="estimate")
    estimate = run_estimate(cfg)
    rows = table_rows(capsys.readouterr().out)
    # 6 * 128*256 * (4*288 * 4 B, norms in fp32 + 7*288 * 2 B + 4*768 * 2 B) = 2,906,652,672 B
    assert estimate.activation_bytes == 2_906_652_672
    assert rows["weights (fp32, 4 B each)"] == "27.30 MiB"  # fp32 master weights
    assert rows["activations kept for backward (bf16, norms in fp32)*"] == "2,772.00 MiB"
    assert rows["loss (log-softmax + 2 gradients of the logits, fp32)"] == "1,792.00 MiB"  # 14 B a logit
    assert rows["training step"] == "4,673.18 MiB"  # (7,155,360 * 16 + 2,906,652,672 + 1,879,048,192) / 2**20
