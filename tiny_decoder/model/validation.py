"""Whole-model config checks: every part's name is registered, its options are ones its factory takes, and
the parts fit together (an attention that refuses a positional encoding, a window longer than the context).

It sits above ``config.py`` and the part modules (which import the config), so nothing imports in a circle.
"""

from __future__ import annotations

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import efficient_attention  # noqa: F401  (registers linformer, longformer)
from tiny_decoder.model.attention import ATTENTION
from tiny_decoder.model.config import ModelConfig
from tiny_decoder.model.depth import DEPTH
from tiny_decoder.model.embedding import EMBEDDINGS
from tiny_decoder.model.feedforward import ACTIVATIONS
from tiny_decoder.model.norm import NORMS, PLACEMENTS
from tiny_decoder.model.positional import POSITIONAL


def validate_model_config(config: ModelConfig) -> ModelConfig:
    """``config`` with every field checked: the scalars (:meth:`ModelConfig.validate`), then the parts."""
    config.validate()
    validate_parts(config)
    return config


def validate_parts(config: ModelConfig) -> None:
    """Raise :class:`ConfigError` for an unknown part, an option its factory does not take, or a clash."""
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
