"""Causal multi-head self-attention: shared projections, swappable score computation.

:class:`CausalSelfAttention` owns the fused QKV and output projections, applies rotary encodings and the
KV cache; subclasses only implement :meth:`attend` (``q, k, v -> output``). ``standard`` is the explicit
``softmax(QK^T / sqrt(d) + bias) V`` and can record its weights for inspection; ``sdpa`` calls torch's
fused ``scaled_dot_product_attention`` (flash / memory-efficient kernels where the device has them).

Dropout on the attention weights on a CPU: torch has no fused CPU kernel with dropout, so SDPA falls back to
its math path, which keeps the softmax weights, the dropout mask and the dropped weights, ``(B, H, T, T)``
each, of every layer for the backward pass (the stories260K recipe at batch 128: ~3 GiB a layer, ~19 GB for one
step). ``sdpa`` computes that case in query chunks instead (:func:`chunked_dropout_attention`): each chunk is
the same math on ``C`` queries, and is recomputed in the backward pass (activation checkpointing; the saved RNG
state gives the recomputation the forward's dropout mask), so only one chunk's ``(B, H, C, Tk)`` weights exist
at a time. Without dropout, in eval mode and on GPUs the fused kernels run as before.

Heads can be gated and removed (structured pruning, ``tiny_decoder/training/pruning.py``): ``head_gate``, when
set, multiplies each head's output (a 0/1 mask, or ones whose gradient is Michel et al.'s head importance);
:meth:`CausalSelfAttention.keep_heads` removes the other heads' rows of the q/k/v projection and columns of the
output projection, so a layer's ``n_heads`` can be below ``config.n_heads``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tiny_decoder.core.registry import Registry
from tiny_decoder.model.cache import KVCache
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.positional import AttentionInputs, apply_rotary
from tiny_decoder.model.residual_init import is_residual_projection, mark_residual_projection

ATTENTION = Registry("model.attention.name", group="attention", supplied=("config", "layer_index"))


class CausalSelfAttention(nn.Module):
    """Projections, rotary, cache; ``attend`` computes ``(B, H, Tq, D)`` outputs from q, k, v."""

    # positional name -> reason it cannot be used with this attention (checked at config time)
    incompatible_positional: dict[str, str] = {}
    # attends correctly over a static cache's padded buffers (keys at positions 0..max_length-1, the unwritten
    # ones masked by ``inputs.causal_mask``); attentions that assume the keys are exactly 0..Tk-1 set False
    supports_static_cache = True

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout_p = config.dropout if config.attention_dropout is None else config.attention_dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        mark_residual_projection(self.proj)
        self.head_gate: torch.Tensor | None = None  # (n_heads,) factor on each head's output; None: no gate

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads: d_model, less after head pruning."""
        return self.n_heads * self.head_dim

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (self.split_heads(t) for t in self.qkv(x).split(self.inner_dim, dim=2))
        if inputs.rotary is not None:
            q, k = apply_rotary(q, *inputs.rotary), apply_rotary(k, *inputs.rotary)
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
        y = self.attend(q, k, v, inputs)
        if self.head_gate is not None:
            y = y * self.head_gate.to(y.dtype).view(1, -1, 1, 1)
        return self.proj(y.transpose(1, 2).reshape(batch, length, self.inner_dim))

    def keep_heads(self, heads: Sequence[int]) -> None:
        """Physically remove every head not in ``heads`` (indices into this layer's current heads)."""
        heads = sorted(set(heads))
        if not heads or not all(0 <= h < self.n_heads for h in heads):
            raise ValueError(f"keep_heads: need 1 to {self.n_heads} distinct heads in [0, {self.n_heads}), got {heads}")
        columns = torch.cat([torch.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in heads])
        rows = torch.cat([columns + part * self.inner_dim for part in range(3)])  # the q, k and v blocks
        self.qkv = _select_linear(self.qkv, rows.to(self.qkv.weight.device), dim=0)
        self.proj = _select_linear(self.proj, columns.to(self.proj.weight.device), dim=1)
        self.n_heads = len(heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        raise NotImplementedError

    @property
    def active_dropout(self) -> float:
        return self.dropout_p if self.training else 0.0


def _select_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding the ``index`` rows (``dim=0``, outputs) or columns (``dim=1``, inputs) of ``linear``."""
    weight = linear.weight.detach().index_select(dim, index)
    bias = linear.bias
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach().index_select(0, index) if dim == 0 else bias.detach())
    if is_residual_projection(linear):
        mark_residual_projection(out)
    return out


def biased_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, visible: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product scores plus ``bias`` (a positional bias, or None), ``-inf`` where ``visible`` is False."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    return scores.masked_fill(~visible, float("-inf"))


def masked_scores(q: torch.Tensor, k: torch.Tensor, inputs: AttentionInputs, visible: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product scores plus the inputs' positional bias, ``-inf`` where ``visible`` is False."""
    return biased_scores(q, k, inputs.bias, visible)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    """``softmax(QK^T / sqrt(d) + bias)`` over the causally visible keys: ``(B, H, Tq, Tk)``."""
    return torch.softmax(masked_scores(q, k, inputs, inputs.causal_mask), dim=-1)


# elements of one query chunk's (B, H, C, Tk) weights in :func:`chunked_dropout_attention` (32 MiB in fp32): the
# chunk's forward and backward hold a few tensors of that size, a few hundred MiB at most
DROPOUT_CHUNK_ELEMENTS = 2**23


def dropout_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, bias: torch.Tensor | None, p: float
) -> torch.Tensor:
    """``dropout(softmax(QK^T / sqrt(d) + bias), p) V`` over the ``visible`` keys: the reference math, and one
    chunk of :func:`chunked_dropout_attention`."""
    return F.dropout(torch.softmax(biased_scores(q, k, bias, visible), dim=-1), p) @ v


def query_chunk_size(q: torch.Tensor, n_keys: int, max_elements: int | None = None) -> int:
    """Queries per chunk so that a chunk's ``(B, H, C, n_keys)`` weights hold at most ``max_elements`` (default
    :data:`DROPOUT_CHUNK_ELEMENTS`)."""
    batch, heads, _, _ = q.shape
    limit = DROPOUT_CHUNK_ELEMENTS if max_elements is None else max_elements
    return max(1, limit // max(1, batch * heads * n_keys))


def chunked_dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: AttentionInputs,
    p: float,
    chunk_size: int | None = None,
    recompute: bool = True,
) -> torch.Tensor:
    """:func:`dropout_attention` in chunks of ``chunk_size`` queries (default :func:`query_chunk_size`), each
    recomputed in the backward pass when ``recompute`` and gradients are on (module doc): memory
    ``O(B * H * C * Tk)`` instead of ``O(B * H * Tq * Tk)``. Over keys 0..T-1 of queries 0..T-1 a chunk of
    queries ``[s, e)`` reads only keys ``[0, e)`` (the later ones are masked)."""
    n_queries, n_keys = q.shape[2], k.shape[2]
    size = chunk_size or query_chunk_size(q, n_keys)
    prefix = inputs.is_prefill_from_start
    recompute = recompute and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outputs = []
    for start in range(0, n_queries, size):
        end = min(start + size, n_queries)
        keys = end if prefix else n_keys
        visible = inputs.causal_mask[start:end, :keys]
        bias = None if inputs.bias is None else inputs.bias[..., start:end, :keys]
        args = (q[:, :, start:end], k[:, :, :keys], v[:, :, :keys], visible, bias, p)
        if recompute:
            outputs.append(checkpoint(dropout_attention, *args, use_reentrant=False))
        else:
            outputs.append(dropout_attention(*args))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


@ATTENTION.register("standard")
class StandardAttention(CausalSelfAttention):
    """Explicit softmax attention; set ``record_weights`` to keep the last ``(B, H, Tq, Tk)`` weights."""

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__(config, layer_index)
        self.record_weights = False
        self.last_weights: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        weights = attention_probabilities(q, k, inputs)
        if self.record_weights:
            self.last_weights = weights.detach()
        return F.dropout(weights, self.active_dropout) @ v


@ATTENTION.register("sdpa")
class SDPAttention(CausalSelfAttention):
    """``torch.nn.functional.scaled_dot_product_attention`` with the cheapest correct mask.

    Over a static KV cache (compiled decoding) it computes the same thing explicitly instead: the compiler
    fuses those few ops into the decoding step's kernels, while an SDPA call stays an opaque kernel of its own
    (for stories15M at batch 1 on a 2-core CPU: ~1,100 vs ~500 tokens/s, ``benchmarks/generation.py``).
    With attention dropout on a CPU it attends in checkpointed query chunks (module doc).
    """

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        if self.active_dropout > 0 and q.device.type == "cpu" and not inputs.padded_keys:
            return chunked_dropout_attention(q, k, v, inputs, self.active_dropout)
        if inputs.padded_keys:
            return F.dropout(attention_probabilities(q, k, inputs), self.active_dropout) @ v
        if inputs.bias is None:
            if inputs.is_prefill_from_start:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=self.active_dropout, is_causal=True)
            if q.shape[2] == 1:  # one new token sees every cached key; is_causal would align top-left
                return F.scaled_dot_product_attention(q, k, v, dropout_p=self.active_dropout)
            mask = inputs.causal_mask
        else:
            mask = inputs.bias.to(q.dtype).masked_fill(~inputs.causal_mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.active_dropout)
