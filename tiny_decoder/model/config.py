"""ModelConfig: every hyper-parameter of the decoder, validated before anything is built.

Swappable parts (activation, norm, attention, positional encoding, depth) are small dicts whose
``name`` (or, for the norm, ``placement`` and ``kind``) selects an entry of that part's registry and
whose other keys are that entry's options. The config round-trips through plain dicts, which is what
checkpoints store, so a checkpoint rebuilds the exact model. This module knows no part: the part modules import
it, and ``model/validation.py`` (above both) checks the parts' names and options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tiny_decoder.core.checks import check, is_positive, is_positive_int, is_probability
from tiny_decoder.core.errors import ConfigError


def _default(value: dict[str, Any]):
    return field(default_factory=lambda: dict(value))


@dataclass
class ModelConfig:
    """Shape and parts of a :class:`~tiny_decoder.model.transformer.DecoderTransformer`."""

    vocab_size: int = 256
    context_length: int = 8
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    attention_dropout: float | None = None  # on the attention weights; None: ``dropout`` (GPT-2's attn_pdrop)
    bias: bool = True
    tie_embeddings: bool = False
    init_std: float = 0.02
    embedding: dict[str, Any] = _default({"name": "token"})
    activation: dict[str, Any] = _default({"name": "gelu"})
    norm: dict[str, Any] = _default({"placement": "pre", "kind": "layernorm", "eps": 1e-5, "affine": True})
    attention: dict[str, Any] = _default({"name": "sdpa"})
    positional: dict[str, Any] = _default({"name": "learned"})
    depth: dict[str, Any] = _default({"name": "static"})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain mapping (a resolved Hydra node or a checkpoint's hyper-parameters)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model.{unknown[0]} is not a model option; valid options: {', '.join(sorted(known))}")
        plain: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
        config = cls(**plain)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> ModelConfig:
        """Raise :class:`ConfigError` naming the first invalid scalar field and how to fix it (the parts are
        checked by :func:`tiny_decoder.model.validation.validate_model_config`, which knows their registries)."""
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "d_ff"):
            check(f"model.{name}", getattr(self, name), is_positive_int, "a positive integer")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}); "
                f"try n_heads in {_divisors(self.d_model)}"
            )
        check("model.dropout", self.dropout, is_probability, "in [0, 1)")
        if self.attention_dropout is not None:
            check("model.attention_dropout", self.attention_dropout, is_probability, "in [0, 1) or null")
        check("model.init_std", self.init_std, is_positive, "a positive number")
        return self


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
