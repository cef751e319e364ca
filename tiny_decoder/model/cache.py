"""KV cache for incremental decoding: preallocated key/value buffers for every layer.

Keys are stored after any rotary encoding, so a cached key never needs re-rotating; the position of a
new token is the cache's current length.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of all layers, shape ``(n_layers, batch, n_heads, max_length, head_dim)``."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        max_length: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layers, batch_size, n_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``(B, H, T, D)`` keys/values of ``layer``; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; appending would reach {end}")
        heads = k.shape[1]  # a head-pruned layer (fewer heads than the model's n_heads) uses the first slots
        self.keys[layer, :, :heads, self.length : end] = k
        self.values[layer, :, :heads, self.length : end] = v
        return self.keys[layer, :, :heads, :end], self.values[layer, :, :heads, :end]

    def advance(self, n_tokens: int) -> None:
        """Called once per forward, after every layer appended its ``n_tokens`` new positions."""
        self.length += n_tokens

    def reset(self) -> None:
        self.length = 0
