"""The memory estimate: the analytic parameter count equals the real model's, memory figures by hand."""

from __future__ import annotations

import itertools

import pytest

from tiny_decoder.estimate import analytic_parameter_count, estimate_memory, exact_parameter_count, run_estimate
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


def test_memory_figures_by_hand():
    config = ModelConfig(vocab_size=256, context_length=8, d_model=64, n_layers=3, n_heads=4, d_ff=256)
    estimate = estimate_memory(config, batch_size=32)
    params = DecoderTransformer(config).num_parameters()
    assert estimate.parameter_bytes == 4 * params
    assert estimate.optimizer_bytes == 8 * params  # AdamW: two fp32 moments
    card = 3 * 3 * (2 * (64 * 4 * 8 * 4) + 256 * 8 * 4) * 32
    assert estimate.activation_bytes_card == card
    detailed = int(3 * 8 * 32 * 64 * (34 + 5 * 4 * 8 / 64) * 2 + 32 * 8 * 256 * 4 * 2)
    assert estimate.activation_bytes_detailed == detailed
    assert estimate.total_bytes == 16 * params + detailed


def test_cli_estimate_of_the_card_recipe(compose_config, capsys):
    cfg = compose_config("+experiment=sequence_seed", "budget_gb=8", config_name="estimate")
    estimate = run_estimate(cfg)
    out = capsys.readouterr().out
    assert estimate.parameters == 1094
    assert "1,094" in out and "fits" in out
    tiny_budget = compose_config("+experiment=sequence_strong", "budget_gb=0.0001", config_name="estimate")
    run_estimate(tiny_budget)
    assert "does NOT fit" in capsys.readouterr().out
