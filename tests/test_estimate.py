"""The memory estimate: the analytic parameter count equals the real model's, memory figures by hand in each
precision, the precision taken from the run's config, and the table of the real command."""

from __future__ import annotations

import itertools
import re

import pytest

from tests.helpers import run_module
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.estimate import (
    analytic_parameter_count,
    estimate_memory,
    exact_parameter_count,
    precision,
    precision_of,
    run_estimate,
)
from tiny_decoder.model import DecoderTransformer, ModelConfig

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
# per layer b*T*(34*d + 5*h*T) = 32*8*(34*64 + 5*4*8) = 256 * 2,336 = 598,016 elements' worth of 16-bit bytes;
# logits and their gradient 2*b*T*vocab = 2*32*8*256 = 131,072 elements
SMALL_LAYER_16BIT, SMALL_LOGIT_ELEMENTS = 598_016, 131_072


def test_memory_figures_by_hand_in_fp32():
    estimate = estimate_memory(ModelConfig(**SMALL), batch_size=32)  # default: 32-true
    assert estimate.parameters == SMALL_PARAMETERS
    assert estimate.precision.name == "32-true"
    assert estimate.parameter_bytes == estimate.gradient_bytes == 4 * 183_360 == 733_440
    assert estimate.optimizer_bytes == 2 * 4 * 183_360 == 1_466_880  # AdamW: two fp32 moments
    # 3 layers * 598,016 * 4/2 + 131,072 * 4 = 3,588,096 + 524,288
    assert estimate.activation_bytes == 3 * SMALL_LAYER_16BIT * 2 + SMALL_LOGIT_ELEMENTS * 4 == 4_112_384
    assert estimate.total_bytes == 733_440 + 733_440 + 1_466_880 + 4_112_384 == 7_046_144


def test_bf16_mixed_keeps_fp32_weights_and_state_and_halves_the_activations():
    estimate = estimate_memory(ModelConfig(**SMALL), batch_size=32, numerics=precision("bf16-mixed"))
    assert (estimate.precision.weight_dtype, estimate.precision.activation_dtype) == ("fp32", "bf16")
    assert estimate.parameter_bytes == estimate.gradient_bytes == 733_440  # fp32 master weights and gradients
    assert estimate.optimizer_bytes == 1_466_880
    # 3 layers * 598,016 * 2/2 + 131,072 * 2 = 1,794,048 + 262,144
    assert estimate.activation_bytes == 3 * SMALL_LAYER_16BIT + SMALL_LOGIT_ELEMENTS * 2 == 2_056_192
    assert estimate.total_bytes == 2_933_760 + 2_056_192 == 4_989_952


def test_true_half_precision_halves_everything():
    estimate = estimate_memory(ModelConfig(**SMALL), batch_size=32, numerics=precision("bf16-true"))
    assert estimate.parameter_bytes == 2 * 183_360 == 366_720
    assert estimate.total_bytes == 4 * 366_720 + 2_056_192 == 3_523_072


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
    b 128, T 256, d 288, h 6, 6 layers, vocab 4096, fp32: 6 * 128*256*(34*288 + 5*6*256) * 4/2 +
    2*128*256*4096 * 4 = 7,944,011,776 B = 7,576.00 MiB; 16 B for each of the 7,155,360 parameters."""
    result = run_module("tiny_decoder.estimate", "+experiment=stories15m")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training memory (32-true, AdamW, batch 128)" in result.stdout
    rows = table_rows(result.stdout)
    activations = [item for item in rows if item.startswith("activations")]
    assert activations == ["activations (fp32, 4 B each)*"]
    assert rows[activations[0]] == "7,576.00 MiB"
    assert "Korthikanti et al. 2022" in result.stdout
    parts = ["weights (fp32, 4 B each)", "gradients (fp32, 4 B each)", "AdamW state (2 moments, fp32, 4 B each)"]
    assert [rows[item] for item in parts] == ["27.30 MiB", "27.30 MiB", "54.59 MiB"]
    assert rows["total"] == "7,685.18 MiB"  # (7,155,360 * 16 + 7,944,011,776) / 2**20
    assert mib(rows["total"]) == pytest.approx(sum(mib(rows[item]) for item in [*parts, *activations]), abs=0.02)
    assert rows["budget 8 GiB"] == "fits"


def test_a_bf16_mixed_run_is_estimated_with_bf16_activations(compose_config, capsys):
    cfg = compose_config("+experiment=stories15m", "precision=bf16-mixed", config_name="estimate")
    estimate = run_estimate(cfg)
    rows = table_rows(capsys.readouterr().out)
    assert estimate.activation_bytes == 7_944_011_776 // 2
    assert rows["weights (fp32, 4 B each)"] == "27.30 MiB"  # fp32 master weights
    assert rows["activations (bf16, 2 B each)*"] == "3,788.00 MiB"
    assert rows["total"] == "3,897.18 MiB"  # (7,155,360 * 16 + 3,972,005,888) / 2**20
