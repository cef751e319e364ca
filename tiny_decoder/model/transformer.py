"""The decoder-only transformer: embeddings -> blocks -> (final norm) -> output head.

Each :class:`Block` is attention and feed-forward, each wrapped in a residual connection whose norm
placement (pre / post / none) comes from the config. All swappable parts are resolved through their
registries from a validated :class:`ModelConfig`.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from tiny_decoder.model.attention import ATTENTION, CausalSelfAttention
from tiny_decoder.model.cache import KVCache, StaticKVCache
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.depth import DEPTH
from tiny_decoder.model.embedding import EMBEDDINGS
from tiny_decoder.model.feedforward import ACTIVATIONS
from tiny_decoder.model.norm import PLACEMENTS, Placement, build_norm
from tiny_decoder.model.positional import POSITIONAL, AttentionInputs
from tiny_decoder.model.residual_init import is_residual_projection
from tiny_decoder.model.validation import validate_model_config


def _options(part: dict) -> tuple[str, dict]:
    options = dict(part)
    return options.pop("name"), options


class Block(nn.Module):
    """One transformer layer: ``x -> residual(attention) -> residual(feed-forward)``."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        attention_name, attention_options = _options(config.attention)
        activation_name, activation_options = _options(config.activation)
        self.attn: CausalSelfAttention = ATTENTION.build(attention_name, config, layer_index, **attention_options)
        self.ff: nn.Module = ACTIVATIONS.build(
            activation_name, config.d_model, config.d_ff, config.bias, **activation_options
        )
        self.norm_attn = build_norm(config.norm, config.d_model)
        self.norm_ff = build_norm(config.norm, config.d_model)
        self.residual: Placement = PLACEMENTS.build(config.norm["placement"])
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None = None) -> torch.Tensor:
        x = self.residual(x, lambda h: self.dropout(self.attn(h, inputs, cache)), self.norm_attn)
        return self.residual(x, lambda h: self.dropout(self.ff(h)), self.norm_ff)


class DecoderTransformer(nn.Module):
    """Maps token ids ``(B, T)`` to next-token logits ``(B, T, vocab_size)``; optionally uses a KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = validate_model_config(config)
        embedding_name, embedding_options = _options(config.embedding)
        positional_name, positional_options = _options(config.positional)
        depth_name, depth_options = _options(config.depth)
        self.embedding = EMBEDDINGS.build(embedding_name, config, **embedding_options)
        self.positional = POSITIONAL.build(positional_name, config, **positional_options)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.depth = DEPTH.build(depth_name, config, **depth_options)
        final_norm = PLACEMENTS.build(config.norm["placement"]).final_norm
        self.final_norm = build_norm(config.norm, config.d_model) if final_norm else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.head.weight = self.embedding.weight

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, init_std), residual projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear) and module.in_features > 1:
            scale = 1 / math.sqrt(2 * self.config.n_layers) if is_residual_projection(module) else 1
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def new_cache(
        self,
        batch_size: int,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> KVCache:
        """An empty KV cache on this model's device for up to ``max_length`` (default: context) positions;
        ``static``: a :class:`StaticKVCache` (fixed shapes, for compiled decoding)."""
        max_length = max_length or self.config.context_length
        if max_length > self.config.context_length:
            raise ValueError(
                f"a KV cache of {max_length} positions exceeds model.context_length={self.config.context_length}"
            )
        if static and not self.supports_static_cache:
            names = sorted({type(block.attn).__name__ for block in self.layers if not block.attn.supports_static_cache})
            raise ValueError(f"{', '.join(names)} cannot decode with a static KV cache; use attention=sdpa or standard")
        weight = self.head.weight
        cache_type = StaticKVCache if static else KVCache
        return cache_type(
            [block.attn.n_heads for block in self.layers],
            batch_size,
            self.config.head_dim,
            max_length,
            device=weight.device,
            dtype=dtype or weight.dtype,
        )

    @property
    def layers(self) -> list[Block]:
        """The blocks, typed as such (``self.blocks`` is an ``nn.ModuleList``, whose items are plain Modules)."""
        return cast("list[Block]", list(self.blocks))

    @property
    def supports_static_cache(self) -> bool:
        """Every layer's attention can attend over padded (partly unwritten) static cache buffers."""
        return all(block.attn.supports_static_cache for block in self.layers)

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states ``(..., d_model)``: the final norm (if any), then the head. Early exit reads
        every layer through it (CALM's shared head)."""
        return self.head(self.final_norm(hidden))

    def embed(self, ids: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, AttentionInputs]:
        """Input of the first block ``(B, T, d_model)`` and the attention inputs of these positions."""
        if ids.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, length), got {tuple(ids.shape)}")
        length = ids.shape[1]
        if cache is None:
            if length > self.config.context_length:
                raise ValueError(
                    f"sequence of {length} positions exceeds model.context_length={self.config.context_length}"
                )
            q_pos = k_pos = torch.arange(length, device=ids.device)
        else:
            q_pos, k_pos = cache.positions(length, ids.device)
        x = self.embedding(ids)
        additive = self.positional.embed(q_pos)
        if additive is not None:
            x = x + additive.to(x.dtype)
        padded = cache is not None and cache.padded_keys
        return self.dropout(x), self.positional.attention_inputs(q_pos, k_pos, padded_keys=padded)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states ``(B, T, d_model)`` before the head (after the final norm, if any)."""
        x, inputs = self.embed(ids, cache)
        x = self.depth(self.blocks, x, inputs, cache, self.readout)
        if cache is not None:
            cache.advance(ids.shape[1])
        return self.final_norm(x)

    def exit_logits(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit the depth strategy trains with its own loss, the model's output last: one entry
        (``forward(ids)``) except for early exit, which reads the shared head after every block."""
        x, inputs = self.embed(ids)
        return [self.readout(h) for h in self.depth.exit_states(self.blocks, x, inputs, self.readout)]

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        logits = self.head(self.hidden_states(ids, cache))
        assert logits.shape == (*ids.shape, self.config.vocab_size)
        return logits
