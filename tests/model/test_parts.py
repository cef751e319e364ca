"""Norms (LayerNorm, RMSNorm, their placement) and feed-forward activations against their formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model.feedforward import ACTIVATIONS, swiglu_hidden_size
from tiny_decoder.model.norm import PLACEMENTS, build_norm
from tiny_decoder.model.positional import AttentionInputs


def _norm(kind: str, d_model: int = 16) -> nn.Module:
    return build_norm({"placement": "pre", "kind": kind, "eps": 1e-15, "affine": True}, d_model).double()


def _x() -> torch.Tensor:
    return 3 * torch.randn(2, 5, 16, dtype=torch.float64) + 1.5


def test_layernorm_output_has_zero_mean_unit_variance():
    y = _norm("layernorm")(_x())
    assert_close(y.mean(dim=-1), torch.zeros(2, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert_close(y.var(dim=-1, unbiased=False), torch.ones(2, 5, dtype=torch.float64), rtol=0, atol=1e-9)


def test_rmsnorm_output_has_unit_rms():
    x = _x()
    y = _norm("rmsnorm")(x)
    assert_close(y.pow(2).mean(dim=-1).sqrt(), torch.ones(2, 5, dtype=torch.float64), rtol=0, atol=1e-9)
    assert_close(y, x / x.pow(2).mean(dim=-1, keepdim=True).sqrt(), rtol=0, atol=1e-12)  # no centring


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0, 1000.0])
def test_norms_are_scale_invariant(kind, scale):
    norm, x = _norm(kind), _x()
    assert_close(norm(scale * x), norm(x), rtol=0, atol=1e-9)


def test_norm_placements_wire_the_residual():
    x = torch.randn(3, 4)
    f = lambda h: 2 * h + 1  # noqa: E731
    norm = nn.LayerNorm(4)
    assert_close(PLACEMENTS.build("pre")(x, f, norm), x + f(norm(x)))
    assert_close(PLACEMENTS.build("post")(x, f, norm), norm(x + f(x)))
    assert_close(PLACEMENTS.build("none")(x, f, norm), x + f(x))


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_pre_has_a_final_norm_post_does_not(build, kind):
    norm_type = nn.LayerNorm if kind == "layernorm" else nn.RMSNorm
    pre = build(norm={"placement": "pre", "kind": kind})
    post = build(norm={"placement": "post", "kind": kind})
    assert isinstance(pre.final_norm, norm_type)
    assert isinstance(post.final_norm, nn.Identity)
    for model in (pre, post):
        assert all(isinstance(b.norm_attn, norm_type) and isinstance(b.norm_ff, norm_type) for b in model.blocks)
    assert pre.num_parameters() == post.num_parameters() + sum(p.numel() for p in pre.final_norm.parameters())


def test_no_norm_placement_has_no_norm_parameters(build):
    model = build(norm={"placement": "none"})
    assert not any(isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for m in model.modules())
    assert not [name for name, _ in model.named_parameters() if "norm" in name]
    pre = build(norm={"placement": "pre"})
    n_norms = 2 * len(pre.blocks) + 1
    assert pre.num_parameters() - model.num_parameters() == n_norms * 2 * 8  # weight + bias of d_model=8


ACTIVATION_FORMULAS = {
    "relu": lambda h: torch.clamp(h, min=0),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / 2**0.5)),
    "swish": lambda h: h * torch.sigmoid(h),
}


@pytest.mark.parametrize("name", list(ACTIVATION_FORMULAS))
def test_mlp_activation_matches_formula(name):
    ff = ACTIVATIONS.build(name, 8, 32, True).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    hidden = x @ ff.up.weight.T + ff.up.bias
    expected = ACTIVATION_FORMULAS[name](hidden) @ ff.down.weight.T + ff.down.bias
    assert_close(ff(x), expected, rtol=0, atol=1e-12)


def test_gelu_tanh_approximation_is_an_option():
    ff = ACTIVATIONS.build("gelu", 8, 32, True, approximate="tanh").double()
    h = torch.linspace(-4, 4, 101, dtype=torch.float64)
    tanh_form = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
    assert_close(ff.act(h), tanh_form, rtol=0, atol=1e-12)


def test_swiglu_matches_formula():
    ff = ACTIVATIONS.build("swiglu", 8, 48, True).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    gate, up = x @ ff.gate.weight.T + ff.gate.bias, x @ ff.up.weight.T + ff.up.bias
    expected = (gate * torch.sigmoid(gate) * up) @ ff.down.weight.T + ff.down.bias
    assert_close(ff(x), expected, rtol=0, atol=1e-12)


def test_swiglu_hidden_size_and_parameter_count():
    assert swiglu_hidden_size(48) == 32  # round(2/3 * 48)
    assert swiglu_hidden_size(256) == 171  # round(170.67)
    assert swiglu_hidden_size(100, multiple_of=8) == 64  # round(66.67) = 67 -> nearest multiple of 8
    count = lambda name, bias: sum(p.numel() for p in ACTIVATIONS.build(name, 16, 48, bias).parameters())  # noqa: E731
    assert ACTIVATIONS.build("swiglu", 16, 48, True).gate.out_features == 32
    # 2-matrix MLP: 2 * 16 * 48 (+ 48 + 16 biases); SwiGLU: 3 * 16 * 32 (+ 32 + 32 + 16 biases)
    assert count("gelu", False) == 1536 and count("swiglu", False) == 1536
    assert count("gelu", True) == 1600 and count("swiglu", True) == 1616
    assert abs(count("swiglu", True) / count("gelu", True) - 1) < 0.02


@pytest.mark.parametrize(("dropout", "attention_dropout", "attention_random"), [(0.5, 0.0, False), (0.0, 0.5, True),
                                                                               (0.5, None, True)])  # fmt: skip
def test_attention_dropout_is_its_own_knob(build, dropout, attention_dropout, attention_random):
    """``model.attention_dropout`` drops attention weights (null: ``model.dropout``), apart from residual dropout."""
    attention = build(dropout=dropout, attention_dropout=attention_dropout, attention={"name": "sdpa"}).blocks[0].attn
    attention.train()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    inputs = AttentionInputs(torch.arange(12), torch.arange(12))
    assert torch.equal(attention(x, inputs), attention(x, inputs)) is not attention_random


def test_attention_dropout_is_validated(make_config):
    with pytest.raises(ConfigError, match=r"model.attention_dropout must be in \[0, 1\) or null, got 1.5"):
        make_config(attention_dropout=1.5).validate()
