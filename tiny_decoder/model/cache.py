"""KV caches for incremental decoding: preallocated key/value buffers, one pair per layer.

Keys are stored after any rotary encoding, so a cached key never needs re-rotating; the position of a
new token is the number of positions already cached. Two kinds, with the same interface
(:meth:`positions`, :meth:`append`, :meth:`advance`):

* :class:`KVCache` counts positions in a Python int; attention sees exactly the filled prefix, so each step's
  key length grows (the eager default: the least work per token).
* :class:`StaticKVCache` keeps the position in a tensor and attention always sees every slot of the buffers,
  the causal mask hiding the unwritten ones (``k_pos > q_pos``). Every decoding step then has the same
  shapes and no Python-side state changes, which is what ``torch.compile`` needs to turn the one-token step
  into a single graph (``tiny_decoder.model.generation``).

Buffers are separate tensors per layer (not views of one tensor): a compiled step writes into them in place
instead of copying a whole stacked buffer. A head-pruned layer gets buffers for its own number of heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _buffers(
    heads_per_layer: Sequence[int], batch_size: int, max_length: int, head_dim: int, device, dtype
) -> list[torch.Tensor]:
    return [
        torch.zeros(batch_size, heads, max_length, head_dim, device=device, dtype=dtype) for heads in heads_per_layer
    ]


class KVCache:
    """Keys and values of every layer, ``keys[layer]`` of shape ``(batch, heads, max_length, head_dim)``."""

    padded_keys = False  # append returns only written positions: attention needs no mask for one new query

    def __init__(
        self,
        heads_per_layer: Sequence[int],
        batch_size: int,
        head_dim: int,
        max_length: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.keys = _buffers(heads_per_layer, batch_size, max_length, head_dim, device, dtype)
        self.values = _buffers(heads_per_layer, batch_size, max_length, head_dim, device, dtype)
        self.max_length = max_length
        self.reset()

    def positions(self, n_new: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the ``n_new`` queries and of every key attention will see (``(Tq,)``, ``(Tk,)``)."""
        end = self.length + n_new
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; appending would reach {end}")
        return torch.arange(self.length, end, device=device), torch.arange(end, device=device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``(B, H, T, D)`` keys/values of ``layer``; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Called once per forward, after every layer appended its ``n_tokens`` new positions."""
        self._length += n_tokens

    @property
    def length(self) -> int:
        """Positions cached so far."""
        return self._length

    def reset(self) -> None:
        self._length = 0


class StaticKVCache(KVCache):
    """Fixed shapes for compiled decoding: the position is a tensor, attention sees all ``max_length`` slots.

    The caller keeps the sequence within ``max_length`` (``tiny_decoder.model.generation`` switches to recomputing
    the cropped window past the context); ``length`` reads the position back to the host (a sync on GPUs).
    """

    padded_keys = True  # keys past the newest query are unwritten slots: attention must apply the causal mask

    @property
    def length(self) -> int:
        return int(self.position)

    def positions(self, n_new: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.position + torch.arange(n_new, device=device), torch.arange(self.max_length, device=device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.position + torch.arange(k.shape[2], device=k.device)
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)
        return self.keys[layer], self.values[layer]

    def advance(self, n_tokens: int) -> None:
        self.position.add_(n_tokens)

    def reset(self) -> None:
        self.position = torch.zeros((), dtype=torch.long, device=self.keys[0].device)
