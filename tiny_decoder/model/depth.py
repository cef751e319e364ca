"""How the stack of blocks is run: every block, in order (``static``).

A depth strategy receives the blocks and the hidden states and returns the final hidden states; dynamic
variants (LayerDrop, early exit) register here too.
"""

from __future__ import annotations

import torch
from torch import nn

from tiny_decoder.model.cache import KVCache
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.positional import AttentionInputs
from tiny_decoder.model.registry import Registry

DEPTH = Registry("model.depth.name", group="depth", supplied=("config",))


@DEPTH.register("static")
class StaticDepth(nn.Module):
    """Run every block once, in order."""

    def __init__(self, config: ModelConfig):
        super().__init__()

    def forward(
        self, blocks: nn.ModuleList, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None
    ) -> torch.Tensor:
        for block in blocks:
            x = block(x, inputs, cache)
        return x
