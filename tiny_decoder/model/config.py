"""ModelConfig: every hyper-parameter of the decoder, validated before anything is built.

Swappable parts (activation, norm, attention, positional encoding, depth) are small dicts whose
``name`` (or, for the norm, ``placement`` and ``kind``) selects an entry of that part's registry and
whose other keys are that entry's options. The config round-trips through plain dicts, which is what
checkpoints store, so a checkpoint rebuilds the exact model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tiny_decoder.model.registry import ConfigError


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
        plain = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
        config = cls(**plain)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> ModelConfig:
        """Raise :class:`ConfigError` naming the first invalid field and how to fix it."""
        _check_positive_ints(self, "vocab_size", "context_length", "d_model", "n_layers", "n_heads", "d_ff")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}); "
                f"try n_heads in {_divisors(self.d_model)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"model.attention_dropout must be in [0, 1) or null, got {self.attention_dropout}")
        if not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise ConfigError(f"model.init_std must be a positive number, got {self.init_std}")
        _validate_parts(self)
        return self


def _check_positive_ints(config: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _validate_parts(config: ModelConfig) -> None:
    # Imported here: the part modules import this one for type hints.
    from tiny_decoder.model.attention import ATTENTION
    from tiny_decoder.model.depth import DEPTH
    from tiny_decoder.model.embedding import EMBEDDINGS
    from tiny_decoder.model.feedforward import ACTIVATIONS
    from tiny_decoder.model.norm import NORMS, PLACEMENTS
    from tiny_decoder.model.positional import POSITIONAL

    for part, registry in (
        ("embedding", EMBEDDINGS),
        ("activation", ACTIVATIONS),
        ("attention", ATTENTION),
        ("positional", POSITIONAL),
        ("depth", DEPTH),
    ):
        options = dict(getattr(config, part))
        if "name" not in options:
            raise ConfigError(f"model.{part}.name is missing; choose one of: {', '.join(registry.names())}")
        name = options.pop("name")
        registry.get(name)
        registry.check_options(name, options)

    norm = dict(config.norm)
    PLACEMENTS.get(norm.pop("placement", None))
    NORMS.get(norm.pop("kind", "layernorm"))
    eps = norm.pop("eps", 1e-5)
    norm.pop("affine", None)
    if norm:
        raise ConfigError(f"model.norm.{next(iter(norm))} is not a norm option; options: placement, kind, eps, affine")
    if not eps > 0:
        raise ConfigError(f"model.norm.eps must be positive, got {eps}")

    attention_cls = ATTENTION.get(config.attention["name"])
    positional_name = config.positional["name"]
    reason = getattr(attention_cls, "incompatible_positional", {}).get(positional_name)
    if reason:
        raise ConfigError(
            f"attention={config.attention['name']} cannot be combined with positional={positional_name}: {reason}"
        )
    check_attention = getattr(attention_cls, "check", None)  # option values (e.g. a window >= 1)
    if check_attention is not None:
        check_attention(config)
    POSITIONAL.get(positional_name).check(config)
    EMBEDDINGS.get(config.embedding["name"]).check(config)
