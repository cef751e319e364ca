"""Sub-quadratic causal attention: ``linformer`` (block-causal variant) and ``longformer`` (sliding window).

Both subclass :class:`~tiny_decoder.model.attention.CausalSelfAttention`, so projections, rotary encodings
and the KV cache are shared with ``standard``/``sdpa``; they only replace :meth:`attend`. Both assume what
:class:`~tiny_decoder.model.transformer.DecoderTransformer` passes: the ``Tk`` keys are positions
``0..Tk-1`` and the ``Tq`` queries are the last ``Tq`` of them (``Tq == Tk`` without a cache).

``longformer`` (Beltagy et al. 2020, decoder form): key ``j`` is visible to query ``i`` iff
``i - window < j <= i`` (causal sliding window of ``window`` keys, the query's own included) or
``j < n_global and j <= i`` (global prefix tokens). Unlike the paper's encoder, the global tokens do NOT
attend everywhere: a global token ``i`` still sees only ``j <= i``, or the model would not be causal.
``implementation="banded"`` is O(T * (window + n_global)) in memory and compute: keys/values are padded
and unfolded into ``(B, H, T, D, window)`` windows, scored together with the ``(B, H, T, n_global)``
global-key scores in one softmax (a global key inside the window is counted once, in the global part).
``implementation="masked"`` is the reference: full ``(T, T)`` scores plus a mask.

``linformer`` (Wang et al. 2020) projects keys/values along the sequence with learned ``(k, n)`` matrices
``E``, ``F``; as published every output sees the whole sequence, so it is not causal. Here it is made
causal block-wise: the sequence is split into blocks of ``block_size`` tokens; a query in block ``b``
attends exactly (causal mask) to the keys of its own block, plus to ``k`` compressed summaries of the
whole fully-past prefix (blocks ``0..b-1``): ``E[:, :b*block_size] @ K[:b*block_size]`` (values likewise
with ``F``; ``E``, ``F`` are ``(k, context_length)``, indexed by absolute position and shared by all
heads of a layer). Queries of block 0 have no summaries. An output at position ``t`` thus depends only on
tokens ``<= t``, and cached decoding equals full recomputation (the summaries are recomputed from the
cached keys: O(t * k * head_dim) per decoded token). ALiBi is refused: a summary mixes many positions and
has no distance to penalise. With ``block_size >= context_length`` it is exact causal attention.

Parameter count: ``longformer`` adds no parameters (same count as ``standard``); ``linformer`` adds
``2 * k * context_length`` per layer (``E`` and ``F``), nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tiny_decoder.core.checks import check_int
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model.attention import ATTENTION, CausalSelfAttention, masked_scores
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.positional import AttentionInputs


def _attention_options(config: ModelConfig) -> dict[str, Any]:
    return {key: value for key, value in config.attention.items() if key != "name"}


def _band_index(n_new: int, n_keys: int, window: int, device: torch.device) -> torch.Tensor:
    """``(Tq, window)`` absolute key index of each window slot: ``i - window + 1 + m`` (may be negative)."""
    q_pos = torch.arange(n_keys - n_new, n_keys, device=device)
    return q_pos.unsqueeze(1) - window + 1 + torch.arange(window, device=device)


def banded_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: AttentionInputs,
    window: int,
    n_global: int,
    dropout: float,
) -> torch.Tensor:
    """Sliding-window + global-prefix attention in O(Tq * (window + n_global)); never builds ``(Tq, Tk)``."""
    batch, heads, n_new, dim = q.shape
    n_keys = k.shape[2]
    scale = 1.0 / math.sqrt(dim)
    first = n_keys - n_new - window + 1  # key index of the first query's first window slot
    pad = (0, 0, max(-first, 0), 0)  # zero keys standing in for positions < 0 (masked below)
    keys = F.pad(k[:, :, max(first, 0) :], pad).unfold(2, window, 1)  # (B, H, Tq, D, w), a view
    values = F.pad(v[:, :, max(first, 0) :], pad).unfold(2, window, 1)
    index = _band_index(n_new, n_keys, window, q.device)
    band = (q.unsqueeze(-2) @ keys).squeeze(-2) * scale  # (B, H, Tq, w)
    n_glob = min(n_global, n_keys)
    glob = (q @ k[:, :, :n_glob].transpose(-2, -1)) * scale  # (B, H, Tq, g)
    if inputs.bias is not None:
        bias = inputs.bias  # (H, Tq, Tk): read only its band and its global columns
        band = band + bias.gather(-1, index.clamp(min=0).expand(*bias.shape[:-2], -1, -1)).to(band.dtype)
        glob = glob + bias[..., :n_glob].to(glob.dtype)
    # window slots before a global key's end are counted in the global part (or are padding: j < 0)
    band = band.masked_fill(index < n_global, float("-inf"))
    glob = glob.masked_fill(torch.arange(n_glob, device=q.device) > index[:, -1:], float("-inf"))
    weights = F.dropout(torch.softmax(torch.cat([glob, band], dim=-1), dim=-1), dropout)
    out = weights[..., :n_glob] @ v[:, :, :n_glob]
    return out + (values @ weights[..., n_glob:].unsqueeze(-1)).squeeze(-1)


def window_mask(inputs: AttentionInputs, window: int, n_global: int) -> torch.Tensor:
    """Longformer's ``(Tq, Tk)`` visibility: the causal sliding window of ``window`` keys plus the global prefix."""
    q_pos, k_pos = inputs.q_pos.unsqueeze(1), inputs.k_pos.unsqueeze(0)
    return inputs.causal_mask & ((k_pos > q_pos - window) | (k_pos < n_global))


def masked_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: AttentionInputs,
    window: int,
    n_global: int,
    dropout: float,
) -> torch.Tensor:
    """Reference: full ``(Tq, Tk)`` scores with the sliding-window + global-prefix mask."""
    weights = torch.softmax(masked_scores(q, k, inputs, window_mask(inputs, window, n_global)), dim=-1)
    return F.dropout(weights, dropout) @ v


LONGFORMER_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "banded": banded_window_attention,
    "masked": masked_window_attention,
}


@ATTENTION.register("longformer")
class LongformerAttention(CausalSelfAttention):
    """Causal sliding window of ``window`` keys plus ``n_global`` global prefix keys (see module doc)."""

    supports_static_cache = False  # the band is laid out from the key count (keys 0..Tk-1)

    def __init__(
        self,
        config: ModelConfig,
        layer_index: int = 0,
        window: int = 64,
        n_global: int = 0,
        implementation: str = "banded",
    ):
        super().__init__(config, layer_index)
        self.validate_options(window=window, n_global=n_global, implementation=implementation)
        self.window = window
        self.n_global = n_global
        self.implementation = implementation

    @staticmethod
    def validate_options(window: int = 64, n_global: int = 0, implementation: str = "banded") -> None:
        check_int("model.attention.window", window, 1)
        check_int("model.attention.n_global", n_global, 0)
        if implementation not in LONGFORMER_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.attention.implementation='{implementation}' is unknown for attention=longformer; "
                f"choose one of: {', '.join(LONGFORMER_IMPLEMENTATIONS)}"
            )

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        cls.validate_options(**_attention_options(config))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        implementation = LONGFORMER_IMPLEMENTATIONS[self.implementation]
        return implementation(q, k, v, inputs, self.window, self.n_global, self.active_dropout)


@ATTENTION.register("linformer")
class LinformerAttention(CausalSelfAttention):
    """Block-causal Linformer: exact attention in the current block, ``k`` summaries of the past ones."""

    supports_static_cache = False  # blocks and summaries are cut from the key count (keys 0..Tk-1)

    incompatible_positional = {
        "alibi": "ALiBi penalises each key by its distance to the query, but linformer's compressed "
        "summaries mix many positions and have no distance; use rope or an additive encoding"
    }

    def __init__(self, config: ModelConfig, layer_index: int = 0, k: int = 16, block_size: int | None = None):
        super().__init__(config, layer_index)
        self.validate_options(k=k, block_size=block_size)
        self.k = k
        self.block_size = block_size if block_size is not None else k
        # E (keys) and F (values) of the paper, indexed by absolute position; std 1/sqrt(n) keeps a
        # summary of the full context about as large as one key
        std = 1.0 / math.sqrt(config.context_length)
        self.key_proj = nn.Parameter(torch.randn(k, config.context_length) * std)
        self.value_proj = nn.Parameter(torch.randn(k, config.context_length) * std)

    @staticmethod
    def validate_options(k: int = 16, block_size: int | None = None) -> None:
        check_int("model.attention.k", k, 1)
        if block_size is not None:
            check_int("model.attention.block_size", block_size, 1)

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        cls.validate_options(**_attention_options(config))

    def summaries(self, x: torch.Tensor, proj: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """``(B, H, last - first + 1, k, D)``: row ``b`` is ``proj[:, :b*c] @ x[:b*c]`` for blocks first..last."""
        batch, heads, _, dim = x.shape
        c, n = self.block_size, last - first
        proj = proj.to(x.dtype)
        base = torch.einsum("kn,bhnd->bhkd", proj[:, : first * c], x[:, :, : first * c]).unsqueeze(2)
        blocks = x[:, :, first * c : last * c].reshape(batch, heads, n, c, dim)
        partial = torch.einsum("kjc,bhjcd->bhjkd", proj[:, first * c : last * c].reshape(self.k, n, c), blocks)
        return torch.cat([base, base + partial.cumsum(dim=2)], dim=2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        batch, heads, n_new, dim = q.shape
        n_keys, c = k.shape[2], self.block_size
        start = n_keys - n_new  # position of the first query
        first, last = start // c, (n_keys - 1) // c  # blocks holding the queries
        n_blocks = last - first + 1
        front, back = start - first * c, (last + 1) * c - n_keys
        scale = 1.0 / math.sqrt(dim)

        def blocked(x: torch.Tensor, pad_front: int) -> torch.Tensor:
            return F.pad(x, (0, 0, pad_front, back)).view(batch, heads, n_blocks, c, dim)

        qb, kb, vb = blocked(q, front), blocked(k[:, :, first * c :], 0), blocked(v[:, :, first * c :], 0)
        local = (qb @ kb.transpose(-2, -1)) * scale  # (B, H, blocks, c, c)
        local = local.masked_fill(~torch.ones(c, c, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        keys, values = self.summaries(k, self.key_proj, first, last), self.summaries(v, self.value_proj, first, last)
        summary = (qb @ keys.transpose(-2, -1)) * scale  # (B, H, blocks, c, k)
        no_past = torch.arange(first, last + 1, device=q.device).view(-1, 1, 1) == 0
        summary = summary.masked_fill(no_past, float("-inf"))
        weights = F.dropout(torch.softmax(torch.cat([summary, local], dim=-1), dim=-1), self.active_dropout)
        out = weights[..., : self.k] @ values + weights[..., self.k :] @ vb
        return out.reshape(batch, heads, n_blocks * c, dim)[:, :, front : front + n_new]
