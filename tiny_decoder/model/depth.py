"""How the stack of blocks is run: ``static`` (every block), ``layerdrop`` and ``early_exit``.

A depth strategy receives the blocks, the hidden states, the attention inputs, the KV cache and ``readout``
(the model's shared output head: final norm + head, hidden states -> logits) and returns the final hidden
states. Two more hooks serve training: :meth:`DepthStrategy.exit_states` gives the hidden states of every exit
that gets its own loss (only the last layer, except for early exit) and :meth:`DepthStrategy.exit_weights`
their loss weights. In eval mode a dynamic strategy records ``layers_used``, the number of blocks each token
of the last forward went through.

- ``layerdrop`` (Fan et al. 2019, arXiv 1909.11556): in training each block is skipped with probability ``p``
  (one draw per block and batch); eval is deterministic and runs every block, or the sub-network
  ``keep_layers``.
- ``early_exit`` (CALM, Schuster et al. 2022, arXiv 2207.07061): trained with a loss at every layer (the
  shared head read after each block); in eval a token stops after the first layer whose confidence reaches
  ``threshold``. An exited token's hidden state is copied upward: later blocks still compute its keys and
  values from that state (so the KV cache is the same whether a sequence is decoded token by token or
  encoded at once) but its output is discarded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.core.registry import Registry
from tiny_decoder.model.cache import KVCache
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.positional import AttentionInputs

DEPTH = Registry("model.depth.name", group="depth", supplied=("config",))
# early exit: (readout, hidden, previous hidden) -> (B, T) confidence that the token may stop here
CONFIDENCES = Registry("model.depth.confidence", group="depth.confidence")
# early exit: number of layers -> loss weight of each layer's exit during training
EXIT_WEIGHTS = Registry("model.depth.layer_weights", group="depth.layer_weights")

Readout = Callable[[torch.Tensor], torch.Tensor]


def run_blocks(
    blocks: Iterable[nn.Module], x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None
) -> torch.Tensor:
    for block in blocks:
        x = block(x, inputs, cache)
    return x


class DepthStrategy(nn.Module):
    """Base: every block once; no intermediate exits; ``layers_used`` stays None (nothing to report)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_layers = config.n_layers
        self.layers_used: torch.Tensor | None = None  # (B, T) blocks run per token in the last eval forward

    def forward(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        inputs: AttentionInputs,
        cache: KVCache | None,
        readout: Readout | None = None,
    ) -> torch.Tensor:
        return run_blocks(blocks, x, inputs, cache)

    def exit_states(
        self, blocks: nn.ModuleList, x: torch.Tensor, inputs: AttentionInputs, readout: Readout | None = None
    ) -> list[torch.Tensor]:
        """Hidden states of every exit trained with its own loss (no cache); the last one is the output."""
        return [self(blocks, x, inputs, None, readout)]

    def exit_weights(self, n_exits: int) -> list[float]:
        return [1.0]

    @property
    def layers_per_token(self) -> float | None:
        return None if self.layers_used is None else float(self.layers_used.mean())


@DEPTH.register("static")
class StaticDepth(DepthStrategy):
    """Run every block once, in order."""


# --------------------------------------------------------------------------------------------------------
# LayerDrop
# --------------------------------------------------------------------------------------------------------


def check_layers(keep_layers: Sequence[int] | None, n_layers: int) -> list[int] | None:
    """``keep_layers`` as a sorted list of distinct layer indices in ``[0, n_layers)`` (None: every layer)."""
    if keep_layers is None:
        return None
    layers = list(keep_layers)
    valid = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in layers)
    if not layers or not valid or len(set(layers)) != len(layers):
        raise ConfigError(
            f"model.depth.keep_layers must be distinct layer indices in [0, {n_layers}), got {list(keep_layers)}"
        )
    return sorted(layers)


@DEPTH.register("layerdrop")
class LayerDrop(DepthStrategy):
    """Training: skip each block with probability ``p``. Eval: every block, or only ``keep_layers``."""

    def __init__(self, config: ModelConfig, p: float = 0.1, keep_layers: Sequence[int] | None = None):
        super().__init__(config)
        if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
            raise ConfigError(f"model.depth.p (LayerDrop probability) must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.keep_layers = check_layers(keep_layers, config.n_layers)

    def active_layers(self, n_layers: int) -> list[int]:
        if not self.training:
            return list(range(n_layers)) if self.keep_layers is None else self.keep_layers
        if self.p == 0.0:  # no draw: p=0 consumes no random numbers and is the static model exactly
            return list(range(n_layers))
        return (torch.rand(n_layers) >= self.p).nonzero().flatten().tolist()

    def forward(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        inputs: AttentionInputs,
        cache: KVCache | None,
        readout: Readout | None = None,
    ) -> torch.Tensor:
        layers = self.active_layers(len(blocks))
        if not self.training:
            self.layers_used = torch.full(x.shape[:2], float(len(layers)), device=x.device)
        return run_blocks([blocks[i] for i in layers], x, inputs, cache)


# --------------------------------------------------------------------------------------------------------
# Early exit
# --------------------------------------------------------------------------------------------------------


@CONFIDENCES.register("softmax")
def softmax_response(readout: Readout, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """CALM's softmax response: top-1 minus top-2 probability of the shared head at this layer."""
    top2 = torch.softmax(readout(hidden).float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@CONFIDENCES.register("max_prob")
def max_probability(readout: Readout, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The probability of the most likely token at this layer."""
    return torch.softmax(readout(hidden).float(), dim=-1).amax(dim=-1)


@CONFIDENCES.register("saturation")
def hidden_state_saturation(readout: Readout, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """CALM's hidden-state saturation: cosine similarity of the states before and after this layer (no head)."""
    return F.cosine_similarity(hidden.float(), previous.float(), dim=-1)


@EXIT_WEIGHTS.register("linear")
def linear_weights(n_layers: int) -> list[float]:
    """CALM: layer i's loss weighted by i / sum(1..L), deeper exits count more."""
    total = n_layers * (n_layers + 1) / 2
    return [(i + 1) / total for i in range(n_layers)]


@EXIT_WEIGHTS.register("uniform")
def uniform_weights(n_layers: int) -> list[float]:
    return [1.0 / n_layers] * n_layers


@DEPTH.register("early_exit")
class EarlyExit(DepthStrategy):
    """Per-token early exit on the shared head's confidence; per-layer losses in training (module doc)."""

    def __init__(
        self,
        config: ModelConfig,
        threshold: float = 0.9,
        confidence: str = "softmax",
        layer_weights: str = "linear",
    ):
        super().__init__(config)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise ConfigError(f"model.depth.threshold must be a number (above 1: never exit), got {threshold!r}")
        self.threshold = float(threshold)
        self.confidence = CONFIDENCES.get(confidence)
        self.layer_weights = EXIT_WEIGHTS.get(layer_weights)

    def exit_states(
        self, blocks: nn.ModuleList, x: torch.Tensor, inputs: AttentionInputs, readout: Readout | None = None
    ) -> list[torch.Tensor]:
        states = []
        for block in blocks:
            x = block(x, inputs, None)
            states.append(x)
        return states

    def exit_weights(self, n_exits: int) -> list[float]:
        return self.layer_weights(n_exits)

    def forward(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        inputs: AttentionInputs,
        cache: KVCache | None,
        readout: Readout | None = None,
    ) -> torch.Tensor:
        if self.training:
            return run_blocks(blocks, x, inputs, cache)
        if readout is None:
            raise ValueError("depth=early_exit needs the model's readout (final norm + head) to measure confidence")
        exited = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        used = torch.full(x.shape[:2], float(len(blocks)), device=x.device)
        for index, block in enumerate(blocks):
            if cache is None and bool(exited.all()):
                break  # nothing later in this forward needs the exited tokens' keys/values
            previous = x
            # exited tokens keep their state (copied upward); the block still caches their keys/values
            x = torch.where(exited.unsqueeze(-1), x, block(x, inputs, cache))
            if index + 1 < len(blocks):
                confident = ~exited & (self.confidence(readout, x, previous) >= self.threshold)
                used = used.masked_fill(confident, float(index + 1))
                exited = exited | confident
        self.layers_used = used
        return x
