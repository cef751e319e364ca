"""Which of the project's models a target format can hold exactly: a Llama-style or a GPT-2-style decoder.

:func:`check_family` raises one :class:`~tiny_decoder.core.errors.ConfigError` line naming the first part the
target cannot express (ALiBi, linformer, post-norm, pruned heads, early exit, ...): an export is the same
model or nothing, never a silently different one.
"""

from __future__ import annotations

from collections.abc import Callable

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model.transformer import DecoderTransformer

# depth strategies whose inference runs every block (LayerDrop only skips blocks while training)
ALL_LAYER_DEPTHS = ("static", "layerdrop")
EXACT_ATTENTIONS = ("sdpa", "standard")  # the same function; the others (linformer, longformer) are not softmax(QK^T)V


def _part(model: DecoderTransformer, field: str) -> str:
    part = getattr(model.config, field)
    return str(part.get("name", part))


def _requirements(family: str) -> dict[str, Callable[[DecoderTransformer], str | None]]:
    """``field -> check(model)``; a check returns what the model has that ``family`` cannot hold, or None."""
    positional = {"llama": "rope", "gpt2": "learned"}[family]
    norm_kind = {"llama": "rmsnorm", "gpt2": "layernorm"}[family]
    activations = {"llama": ("swiglu",), "gpt2": ("gelu",)}[family]

    def named(field: str, allowed: tuple[str, ...]) -> Callable[[DecoderTransformer], str | None]:
        return lambda model: None if _part(model, field) in allowed else f"{field}={_part(model, field)}"

    return {
        "embedding": named("embedding", ("token",)),
        "positional": named("positional", (positional,)),
        "activation": named("activation", activations),
        "attention": named("attention", EXACT_ATTENTIONS),
        "depth": named("depth", ALL_LAYER_DEPTHS),
        "norm.placement": lambda m: (
            None if m.config.norm["placement"] == "pre" else f"norm={m.config.norm['placement']}"
        ),
        "norm.kind": lambda m: None if m.config.norm["kind"] == norm_kind else f"norm.kind={m.config.norm['kind']}",
        "heads": _unpruned_heads,
    }


def _unpruned_heads(model: DecoderTransformer) -> str | None:
    for index, block in enumerate(model.layers):
        if block.attn.n_heads != model.config.n_heads or block.attn.head_gate is not None:
            return f"pruned attention heads (layer {index} has {block.attn.n_heads} of {model.config.n_heads})"
    return None


FAMILY_NAMES = {"llama": "Llama (pre-RMSNorm, SwiGLU, RoPE)", "gpt2": "GPT-2 (pre-LayerNorm, GELU, learned positions)"}


def mismatches(model: DecoderTransformer, family: str) -> list[str]:
    """What ``model`` has that a ``family`` model cannot hold (empty: it maps exactly)."""
    if family not in FAMILY_NAMES:
        raise ConfigError(f"unknown model family {family!r}; known: {', '.join(FAMILY_NAMES)}")
    found = (check(model) for check in _requirements(family).values())
    return [problem for problem in found if problem is not None]


def check_family(model: DecoderTransformer, family: str, target: str) -> None:
    """Raise ConfigError naming the first part of ``model`` that a ``family`` model in ``target`` cannot hold."""
    problems = mismatches(model, family)
    if problems:
        raise ConfigError(
            f"{target} cannot hold this model: it has {problems[0]}, which a {FAMILY_NAMES[family]} model has no "
            "exact equivalent for (nothing was written)"
        )


def family_of(model: DecoderTransformer) -> str:
    """The family ``model`` is closest to (fewest mismatches; Llama on a tie): check_family says if it fits."""
    return min(FAMILY_NAMES, key=lambda family: len(mismatches(model, family)))
