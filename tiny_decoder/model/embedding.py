"""Input encodings: how a token id becomes a ``d_model`` vector.

``token``: a learned lookup table (``nn.Embedding``), the usual choice for text.
``numeric``: the sequence predictor's fixed value feature ``id / max_value`` (see the design card). With
``d_model == 2`` and ``positional=numeric`` the input is exactly the card's 2-d tuple
``(value / max_value, position / max_position)`` with no parameters; wider models map the scalar feature
to ``d_model`` with a learned linear layer.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.core.registry import Registry
from tiny_decoder.model.config import ModelConfig


class EmbeddingFactory(Protocol):
    """An embedding class: built from the config and its options, and checks the config it is used with."""

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module: ...

    def check(self, config: ModelConfig) -> None: ...


EMBEDDINGS: Registry[EmbeddingFactory] = Registry(
    "model.embedding.name", group="model.embedding.name", supplied=("config",)
)


@EMBEDDINGS.register("token")
class TokenEmbedding(nn.Module):
    """Learned ``(vocab_size, d_model)`` table."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.table = nn.Embedding(config.vocab_size, config.d_model)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        return None


class ScalarFeature(nn.Module):
    """Maps a ``(..., 1)`` feature to ``d_model``: onto a fixed axis when ``d_model == 2`` (no parameters,
    the design card's encoding), else through a learned ``Linear(1, d_model)``."""

    direction: torch.Tensor  # buffer

    def __init__(self, d_model: int, axis: int):
        super().__init__()
        self.project = None if d_model == 2 else nn.Linear(1, d_model)
        self.register_buffer("direction", torch.eye(2)[axis], persistent=False)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.project is None:
            return feature.to(self.direction.dtype) * self.direction
        return self.project(feature.to(self.project.weight.dtype))


@EMBEDDINGS.register("numeric")
class NumericEmbedding(nn.Module):
    """The fixed value feature ``id / max_value`` (first coordinate of the card's 2-d encoding)."""

    def __init__(self, config: ModelConfig, max_value: int | None = None):
        super().__init__()
        self.max_value = float(max_value if max_value is not None else config.vocab_size - 1)
        self.project = ScalarFeature(config.d_model, axis=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project((ids.float() / self.max_value).unsqueeze(-1))

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        if config.tie_embeddings:
            raise ConfigError("model.tie_embeddings=true needs model.embedding.name=token (numeric has no table)")
