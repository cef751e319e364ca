"""Positional encodings: RoPE (relative scores, norm-preserving, fp32 angles), ALiBi slopes and bias, the
additive tables and the attention inputs' causal mask."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tiny_decoder.model.positional import (
    POSITIONAL,
    AttentionInputs,
    alibi_slopes,
    apply_rotary,
)


def _rotate(config, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = POSITIONAL.build("rope", config).rotary(positions)
    return apply_rotary(x, cos, sin)


@pytest.mark.parametrize("shift", [1, 7, 100])
def test_rope_scores_depend_only_on_relative_position(make_config, shift):
    config = make_config(d_model=16, n_heads=2, context_length=128)
    q, k = torch.randn(2, 1, 2, 6, 8, dtype=torch.float64)
    positions = torch.arange(6)
    scores = _rotate(config, q, positions) @ _rotate(config, k, positions).transpose(-2, -1)
    shifted = _rotate(config, q, positions + shift) @ _rotate(config, k, positions + shift).transpose(-2, -1)
    assert_close(shifted, scores, rtol=0, atol=1e-5)  # angles are fp32 by design
    unrotated = q @ k.transpose(-2, -1)
    assert_close(
        torch.diagonal(scores, dim1=-2, dim2=-1), torch.diagonal(unrotated, dim1=-2, dim2=-1), rtol=0, atol=1e-5
    )


def test_rope_preserves_norms_and_rotates_half_pairs(make_config):
    config = make_config(d_model=16, n_heads=2)
    x = torch.randn(2, 2, 12, 8, dtype=torch.float64)
    rotated = _rotate(config, x, torch.arange(12))
    assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)
    assert_close(rotated[:, :, 0], x[:, :, 0], rtol=0, atol=0)  # position 0: identity
    # each (i, i + D/2) pair keeps its own norm
    pairs = x[..., :4] ** 2 + x[..., 4:] ** 2
    assert_close(rotated[..., :4] ** 2 + rotated[..., 4:] ** 2, pairs, rtol=1e-6, atol=0)


def test_rope_tables_are_fp32_whatever_the_module_dtype(make_config):
    rope = POSITIONAL.build("rope", make_config(d_model=16, n_heads=2))
    positions = torch.arange(12)
    cos, sin = rope.rotary(positions)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (12, 4)
    for dtype in (torch.bfloat16, torch.float64):
        cast_cos, cast_sin = rope.to(dtype).rotary(positions)
        assert cast_cos.dtype == cast_sin.dtype == torch.float32
        assert torch.equal(cast_cos, cos) and torch.equal(cast_sin, sin)
    # a cached token's angles equal the same row of a full-sequence table
    assert torch.equal(rope.rotary(torch.arange(5, 8))[0], cos[5:8])
    inv_freq = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    assert_close(cos.double(), torch.cos(positions.double().unsqueeze(1) * inv_freq), rtol=0, atol=1e-6)


def test_apply_rotary_computes_in_at_least_fp32_and_keeps_dtype(make_config):
    config = make_config(d_model=16, n_heads=2)
    cos, sin = POSITIONAL.build("rope", config).rotary(torch.arange(5))
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    out = apply_rotary(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    expected = torch.cat([x1 * cos.double() - x2 * sin.double(), x1 * sin.double() + x2 * cos.double()], dim=-1)
    assert out.dtype == torch.float64
    assert_close(out, expected, rtol=0, atol=1e-15)  # no round trip through fp32
    low = apply_rotary(x.bfloat16(), cos, sin)
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, apply_rotary(x.bfloat16().float(), cos, sin).bfloat16())


def test_alibi_slopes_power_of_two():
    assert alibi_slopes(8).tolist() == [2.0**-h for h in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]


def test_alibi_slopes_interleave_for_other_head_counts():
    # n=6: the 4 slopes of n=4 (2^-2, 2^-4, 2^-6, 2^-8), then every other slope of n=8 (2^-1, 2^-3, ...) up to 6
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    # n=3: slopes of n=2 (2^-4, 2^-8), then the first odd one of n=4 (2^-2)
    assert alibi_slopes(3).tolist() == [2.0**-4, 2.0**-8, 2.0**-2]


def test_alibi_bias_is_minus_slope_times_distance(make_config):
    config = make_config(d_model=16, n_heads=4)
    alibi = POSITIONAL.build("alibi", config)
    q_pos, k_pos = torch.arange(3, 6), torch.arange(6)  # three cached queries over six keys
    bias = alibi.bias(q_pos, k_pos)
    assert bias.shape == (4, 3, 6)
    slopes = alibi_slopes(4)
    for h in range(4):
        for a, i in enumerate(q_pos.tolist()):
            for j in range(i + 1):
                assert bias[h, a, j].item() == pytest.approx(-slopes[h].item() * (i - j))
    assert POSITIONAL.build("alibi", config).attention_inputs(q_pos, k_pos).rotary is None


def test_sinusoidal_table_formula(make_config):
    config = make_config(d_model=8, context_length=12)
    table = POSITIONAL.build("sinusoidal", config).embed(torch.arange(12))
    assert table.shape == (12, 8) and table.dtype == torch.float32
    for p in (0, 3, 11):
        for i in range(4):
            angle = p / 10000.0 ** (2 * i / 8)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_learned_table_and_none(make_config):
    config = make_config()
    learned = POSITIONAL.build("learned", config)
    positions = torch.tensor([0, 4, 11])
    assert torch.equal(learned.embed(positions), learned.table.weight[positions])
    none = POSITIONAL.build("none", config)
    assert none.embed(positions) is None and none.rotary(positions) is None and none.bias(positions, positions) is None
    assert list(none.parameters()) == []


def test_numeric_position_feature(make_config):
    numeric = POSITIONAL.build("numeric", make_config(d_model=2, n_heads=1, context_length=8))
    assert list(numeric.parameters()) == []
    expected = torch.stack([torch.zeros(8), torch.arange(8) / 7.0], dim=1)
    assert torch.equal(numeric.embed(torch.arange(8)), expected)
    wide = POSITIONAL.build("numeric", make_config(d_model=8))
    assert wide.embed(torch.arange(4)).shape == (4, 8)


def test_attention_inputs_causal_mask_with_cache_offset():
    full = AttentionInputs(torch.arange(3), torch.arange(3))
    assert full.is_prefill_from_start
    assert torch.equal(full.causal_mask, torch.ones(3, 3, dtype=torch.bool).tril())
    cached = AttentionInputs(torch.tensor([3, 4]), torch.arange(5))
    assert not cached.is_prefill_from_start
    assert cached.causal_mask.tolist() == [[True, True, True, True, False], [True] * 5]
