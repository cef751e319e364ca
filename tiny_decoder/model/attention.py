"""Causal multi-head self-attention: shared projections, swappable score computation.

:class:`CausalSelfAttention` owns the fused QKV and output projections, applies rotary encodings and the
KV cache; subclasses only implement :meth:`attend` (``q, k, v -> output``). ``standard`` is the explicit
``softmax(QK^T / sqrt(d) + bias) V`` and can record its weights for inspection; ``sdpa`` calls torch's
fused ``scaled_dot_product_attention`` (flash / memory-efficient kernels where the device has them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tiny_decoder.model.cache import KVCache
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.positional import AttentionInputs, apply_rotary
from tiny_decoder.model.registry import Registry

ATTENTION = Registry("model.attention.name", group="attention", supplied=("config", "layer_index"))


class CausalSelfAttention(nn.Module):
    """Projections, rotary, cache; ``attend`` computes ``(B, H, Tq, D)`` outputs from q, k, v."""

    # positional name -> reason it cannot be used with this attention (checked at config time)
    incompatible_positional: dict[str, str] = {}

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout_p = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (self.split_heads(t) for t in self.qkv(x).split(width, dim=2))
        if inputs.rotary is not None:
            q, k = apply_rotary(q, *inputs.rotary), apply_rotary(k, *inputs.rotary)
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
        y = self.attend(q, k, v, inputs)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        raise NotImplementedError

    @property
    def active_dropout(self) -> float:
        return self.dropout_p if self.training else 0.0


def masked_scores(q: torch.Tensor, k: torch.Tensor, inputs: AttentionInputs, visible: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product scores plus any positional bias, ``-inf`` where ``visible`` is False."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if inputs.bias is not None:
        scores = scores + inputs.bias.to(scores.dtype)
    return scores.masked_fill(~visible, float("-inf"))


@ATTENTION.register("standard")
class StandardAttention(CausalSelfAttention):
    """Explicit softmax attention; set ``record_weights`` to keep the last ``(B, H, Tq, Tk)`` weights."""

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__(config, layer_index)
        self.record_weights = False
        self.last_weights: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        weights = torch.softmax(masked_scores(q, k, inputs, inputs.causal_mask), dim=-1)
        if self.record_weights:
            self.last_weights = weights.detach()
        return F.dropout(weights, self.active_dropout) @ v


@ATTENTION.register("sdpa")
class SDPAttention(CausalSelfAttention):
    """``torch.nn.functional.scaled_dot_product_attention`` with the cheapest correct mask."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        if inputs.bias is None:
            if inputs.is_prefill_from_start:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=self.active_dropout, is_causal=True)
            if q.shape[2] == 1:  # one new token sees every cached key; is_causal would align top-left
                return F.scaled_dot_product_attention(q, k, v, dropout_p=self.active_dropout)
            mask = inputs.causal_mask
        else:
            mask = inputs.bias.to(q.dtype).masked_fill(~inputs.causal_mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.active_dropout)
