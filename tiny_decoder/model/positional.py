"""Positional encodings and the per-forward attention inputs they produce.

Three ways to tell the model where a token is, all behind one interface so every attention type can
use every encoding it supports:

* additive (``learned``, ``sinusoidal``, ``numeric``): :meth:`PositionalEncoding.embed` returns a
  ``(T, d_model)`` tensor added to the input embeddings;
* rotary (``rope``, Su et al. 2021): :meth:`rotary` returns cos/sin (computed in fp32) that rotate
  queries and keys before the keys are cached;
* bias (``alibi``, Press et al. 2022): :meth:`bias` returns a ``(H, Tq, Tk)`` additive score bias.

:class:`AttentionInputs` bundles, once per forward, what every layer's attention needs: query and key
positions, the rotary tables and the bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.core.registry import Registry
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.embedding import ScalarFeature

POSITIONAL: Registry[type[PositionalEncoding]] = Registry(
    "model.positional.name", group="positional", supplied=("config",)
)


@dataclass
class AttentionInputs:
    """Positions of the ``Tq`` new queries and all ``Tk`` keys, plus position-dependent terms."""

    q_pos: torch.Tensor  # (Tq,)
    k_pos: torch.Tensor  # (Tk,)
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: (Tq, head_dim // 2) each
    bias: torch.Tensor | None = None  # (H, Tq, Tk) additive score bias
    # keys include unwritten slots of a static KV cache: attention must apply ``causal_mask`` even for one query
    padded_keys: bool = False
    # (Tq, Tk) bool, True where key j is visible to query i (k_pos[j] <= q_pos[i]); built once per forward for
    # all layers (not a cached_property: its lock is a graph break under torch.compile on Python < 3.12)
    causal_mask: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.causal_mask = self.k_pos.unsqueeze(0) <= self.q_pos.unsqueeze(1)

    @property
    def is_prefill_from_start(self) -> bool:
        """Queries and keys are the same positions 0..T-1 (no cache offset)."""
        return self.q_pos.shape[0] == self.k_pos.shape[0]


class PositionalEncoding(nn.Module):
    """Base: contributes nothing. Subclasses override the hooks they use."""

    def __init__(self, config: ModelConfig):
        super().__init__()

    def embed(self, positions: torch.Tensor) -> torch.Tensor | None:
        return None

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None

    def attention_inputs(self, q_pos: torch.Tensor, k_pos: torch.Tensor, padded_keys: bool = False) -> AttentionInputs:
        return AttentionInputs(q_pos, k_pos, self.rotary(q_pos), self.bias(q_pos, k_pos), padded_keys)

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        return None


@POSITIONAL.register("none")
class NoPositional(PositionalEncoding):
    """No position information at all (causal masking alone leaks some; NoPE)."""


@POSITIONAL.register("learned")
class LearnedPositional(PositionalEncoding):
    """A learned ``(context_length, d_model)`` table (GPT-2)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.table = nn.Embedding(config.context_length, config.d_model)

    def embed(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table(positions)


def sinusoid_table(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al.'s fixed encoding: sin on even, cos on odd coordinates; ``(T, dim)`` in fp32."""
    half = (dim + 1) // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float32, device=positions.device) * 2 / dim)
    angles = positions.float().unsqueeze(1) * inv_freq
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)
    return table[:, :dim]


@POSITIONAL.register("sinusoidal")
class SinusoidalPositional(PositionalEncoding):
    """Fixed sin/cos encoding, precomputed for ``context_length`` positions."""

    table: torch.Tensor  # buffer

    def __init__(self, config: ModelConfig, base: float = 10000.0):
        super().__init__(config)
        table = sinusoid_table(torch.arange(config.context_length), config.d_model, base)
        self.register_buffer("table", table, persistent=False)

    def embed(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


@POSITIONAL.register("numeric")
class NumericPositional(PositionalEncoding):
    """The design card's position feature ``position / max_position`` (second coordinate of its 2-d input)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.max_position = float(max(config.context_length - 1, 1))
        self.project = ScalarFeature(config.d_model, axis=1)

    def embed(self, positions: torch.Tensor) -> torch.Tensor:
        return self.project((positions.float() / self.max_position).unsqueeze(-1))


@POSITIONAL.register("rope")
class RotaryPositional(PositionalEncoding):
    """Rotary embeddings: each (i, i + D/2) pair of q/k coordinates rotated by ``position * theta_i``."""

    def __init__(self, config: ModelConfig, base: float = 10000.0):
        super().__init__(config)
        self.half_dim = config.head_dim // 2  # not ``half``: that is nn.Module.half()
        self.base = base

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # computed per call, not stored as buffers: ``model.to(bfloat16)`` would cast buffers, and
        # the angles must stay fp32
        steps = torch.arange(self.half_dim, dtype=torch.float32, device=positions.device)
        inv_freq = self.base ** (-steps / self.half_dim)
        angles = positions.float().unsqueeze(1) * inv_freq
        return angles.cos(), angles.sin()

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        if config.head_dim % 2:
            raise ConfigError(
                f"positional=rope needs an even head size, got d_model/n_heads = {config.head_dim}; "
                "change model.d_model or model.n_heads"
            )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, H, T, D)`` by the ``(T, D/2)`` angles (rotate-half layout)."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # >= fp32, fp64 kept
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.'s head slopes: ``2^(-8h/n)`` for a power-of-two n, else their interleaving."""

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two_slopes(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two_slopes(closest) + extra)


@POSITIONAL.register("alibi")
class ALiBiPositional(PositionalEncoding):
    """Linear distance penalty ``-slope_h * (i - j)`` added to attention scores."""

    slopes: torch.Tensor  # buffer

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.register_buffer("slopes", alibi_slopes(config.n_heads), persistent=False)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = (q_pos.unsqueeze(1) - k_pos.unsqueeze(0)).clamp(min=0).float()
        return -self.slopes.view(-1, 1, 1) * distance
