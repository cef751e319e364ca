"""Whole-model invariants (shapes, numeric input encoding, tying, cache limits, config round trip) and the
configuration errors, each checked for the content of its message."""

from __future__ import annotations

import pytest
import torch

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.model.validation import validate_model_config


def _error(config: ModelConfig) -> str:
    with pytest.raises(ConfigError) as error:
        validate_model_config(config)
    return str(error.value)


def test_d_model_not_divisible_by_n_heads_names_both(make_config):
    message = _error(make_config(d_model=10, n_heads=4))
    assert "model.d_model (10)" in message and "model.n_heads (4)" in message
    assert "[1, 2, 5, 10]" in message  # the valid head counts


def test_unknown_attention_lists_the_choices(make_config):
    message = _error(make_config(attention={"name": "flash"}))
    assert "model.attention.name='flash' is unknown" in message
    for name in ("standard", "sdpa", "linformer", "longformer"):
        assert name in message
    assert "attention=<name>" in message


def test_unknown_option_key_names_it_and_the_valid_ones(make_config):
    message = _error(make_config(attention={"name": "sdpa", "windw": 3}))
    assert message == "model.attention.windw is not an option of model.attention.name='sdpa'; its options are: none"
    message = _error(make_config(activation={"name": "gelu", "approx": "tanh"}))
    assert "model.activation.approx" in message and "approximate" in message
    message = _error(make_config(norm={"placement": "pre", "kind": "layernorm", "scale": 2}))
    assert "model.norm.scale" in message and "placement, kind, eps, affine" in message
    with pytest.raises(ConfigError, match="model.n_layer is not a model option"):
        ModelConfig.from_dict({"n_layer": 2})


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range(make_config, dropout):
    assert _error(make_config(dropout=dropout)) == f"model.dropout must be in [0, 1), got {dropout}"


def test_rope_needs_an_even_head_dim(make_config):
    message = _error(make_config(d_model=6, n_heads=2, positional={"name": "rope"}))
    assert "positional=rope" in message and "even head size" in message and "= 3" in message
    validate_model_config(make_config(d_model=6, n_heads=3, positional={"name": "rope"}))  # head_dim 2 is fine


def test_other_config_errors(make_config):
    assert "model.n_layers must be a positive integer, got 0" in _error(make_config(n_layers=0))
    assert "model.init_std" in _error(make_config(init_std=0.0))
    assert "model.norm.eps must be positive" in _error(make_config(norm={"placement": "pre", "eps": 0.0}))
    assert "model.positional.name is missing" in _error(make_config(positional={}))
    message = _error(make_config(embedding={"name": "numeric"}, tie_embeddings=True))
    assert "model.tie_embeddings" in message and "numeric" in message


def test_config_round_trips_through_a_dict(make_config):
    config = make_config(attention={"name": "longformer", "window": 4}, positional={"name": "alibi"})
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_numeric_encoding_is_exactly_value_and_position():
    config = ModelConfig(
        vocab_size=256,
        context_length=8,
        d_model=2,
        n_heads=1,
        n_layers=1,
        d_ff=4,
        embedding={"name": "numeric"},
        positional={"name": "numeric"},
    )
    model = DecoderTransformer(config).eval()
    assert list(model.embedding.parameters()) == [] and list(model.positional.parameters()) == []
    assert not [name for name, _ in model.named_parameters() if name.startswith(("embedding", "positional"))]
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = torch.tensor([[0, 255, 7, 128, 3, 64, 200, 1]])
    model(ids)
    expected = torch.stack([ids[0].float() / 255, torch.arange(8).float() / 7], dim=1).unsqueeze(0)
    assert torch.equal(seen[0], expected)


def test_shapes_tying_and_length_limits(build):
    model = build(tie_embeddings=True)
    assert model.head.weight is model.embedding.weight
    ids = torch.randint(0, 11, (3, 12))
    assert model(ids).shape == (3, 12, 11)
    with pytest.raises(ValueError, match="batch, length"):
        model(ids[0])
    cache = model.new_cache(3, max_length=5)
    assert [tuple(k.shape) for k in cache.keys] == [(3, 2, 5, 4)] * 2 and cache.keys[0].dtype == torch.float64
    model(ids[:, :4], cache)
    with pytest.raises(ValueError, match="KV cache holds 5 positions"):
        model(ids[:, 4:6], cache)


def test_dropout_only_in_training_mode(build):
    model = build(dropout=0.5)
    ids = torch.randint(0, 11, (2, 12))
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))
