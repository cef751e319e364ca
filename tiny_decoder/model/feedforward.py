"""Position-wise feed-forward blocks, one registry entry per activation.

``relu``, ``gelu`` and ``swish`` (SiLU) use the classic two-matrix MLP ``down(act(up(x)))`` with hidden size
``d_ff``. ``swiglu`` (Shazeer 2020) is gated, ``down(silu(gate(x)) * up(x))``, with three matrices; its
hidden size is ``round(2/3 * d_ff)`` (to a multiple of ``multiple_of``) so its parameter count stays
close to the two-matrix MLP's ``2 * d_model * d_ff``.
"""

from __future__ import annotations

import torch
from torch import nn

from tiny_decoder.core.registry import Registry
from tiny_decoder.model.residual_init import mark_residual_projection

ACTIVATIONS = Registry("model.activation.name", group="activation", supplied=("d_model", "d_ff", "bias"))


class FeedForward(nn.Module):
    """``down(act(up(x)))``."""

    def __init__(self, d_model: int, d_ff: int, activation: nn.Module, bias: bool):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.act = activation
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        mark_residual_projection(self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class GatedFeedForward(nn.Module):
    """``down(act(gate(x)) * up(x))``: a GLU-family block (SwiGLU with SiLU)."""

    def __init__(self, d_model: int, hidden: int, activation: nn.Module, bias: bool):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=bias)
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.act = activation
        self.down = nn.Linear(hidden, d_model, bias=bias)
        mark_residual_projection(self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


@ACTIVATIONS.register("relu")
def relu(d_model: int, d_ff: int, bias: bool) -> nn.Module:
    return FeedForward(d_model, d_ff, nn.ReLU(), bias)


@ACTIVATIONS.register("gelu")
def gelu(d_model: int, d_ff: int, bias: bool, approximate: str = "none") -> nn.Module:
    return FeedForward(d_model, d_ff, nn.GELU(approximate=approximate), bias)


@ACTIVATIONS.register("swish")
def swish(d_model: int, d_ff: int, bias: bool) -> nn.Module:
    return FeedForward(d_model, d_ff, nn.SiLU(), bias)


def swiglu_hidden_size(d_ff: int, multiple_of: int = 1) -> int:
    """Hidden size giving SwiGLU's 3 matrices about the parameters of a 2-matrix MLP of width ``d_ff``."""
    hidden = max(1, round(2 * d_ff / 3))
    return multiple_of * max(1, round(hidden / multiple_of))


@ACTIVATIONS.register("swiglu")
def swiglu(d_model: int, d_ff: int, bias: bool, multiple_of: int = 1) -> nn.Module:
    return GatedFeedForward(d_model, swiglu_hidden_size(d_ff, multiple_of), nn.SiLU(), bias)
