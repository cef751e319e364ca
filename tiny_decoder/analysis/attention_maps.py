"""Attention maps of a model, for the ``summary`` tool and the ``AttentionMapLogger`` callback alike.

``attention_weights(model, ids)`` returns the ``(layers, heads, T, T)`` softmax weights of batch element 0:
``standard`` records its own; ``sdpa`` is the same function, so the model is rebuilt with ``attention.name=
standard`` and the same state dict; ``longformer``'s weights are recomputed from its queries and keys under its
sliding-window mask (exactly what its ``masked`` implementation uses); ``linformer`` is refused (its queries
attend to learned summaries that mix many positions: no per-position weights). ``save_attention_png`` draws them
as a ``layers x heads`` grid of heatmaps; ``token_label`` / ``tokenizer_of`` label the axes with token texts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.model.attention import CausalSelfAttention, StandardAttention, masked_scores
from tiny_decoder.model.efficient_attention import LongformerAttention, window_mask
from tiny_decoder.model.positional import AttentionInputs

MAX_TICK_LABEL = 8
MAX_TICKS = 16

A = TypeVar("A", bound=CausalSelfAttention)


def tokenizer_of(source: Any) -> Any | None:
    """``source.tokenizer``, or None when it has none (a task's property may raise until it gets one)."""
    try:
        return getattr(source, "tokenizer", None)
    except (ValueError, RuntimeError):
        return None


def token_label(tokenizer: Any, token_id: int) -> str:
    """The text of one token (spaces shown as ``·``), or its id when the tokenizer cannot decode it alone."""
    text = tokenizer.decode([token_id]) if hasattr(tokenizer, "decode") else ""
    return text.replace(" ", "·").replace("\n", "\\n") or str(token_id)


def attention_modules(model: DecoderTransformer) -> list[CausalSelfAttention]:
    return [block.attn for block in model.layers]


def recorded_weights(module: StandardAttention) -> torch.Tensor:
    """Batch element 0 of the weights ``module`` recorded in the last forward."""
    if module.last_weights is None:
        raise RuntimeError(f"layer {module.layer_index} recorded no attention weights (record_weights is off)")
    return module.last_weights[0]


def standard_weights(model: DecoderTransformer, ids: torch.Tensor) -> torch.Tensor:
    """``(layers, heads, T, T)`` softmax weights recorded by every ``StandardAttention`` of one forward."""
    modules = cast("list[StandardAttention]", attention_modules(model))  # called for attention=standard only
    for module in modules:
        module.record_weights = True
    try:
        with torch.no_grad():
            model(ids)
        return torch.stack([recorded_weights(module) for module in modules])
    finally:
        for module in modules:
            module.record_weights, module.last_weights = False, None


def as_standard_weights(model: DecoderTransformer, ids: torch.Tensor) -> torch.Tensor:
    """The same model with ``attention.name=standard`` and the same state dict (same function as sdpa)."""
    config = ModelConfig.from_dict({**model.config.to_dict(), "attention": {"name": "standard"}})
    standard = DecoderTransformer(config)
    standard.load_state_dict(model.state_dict())
    return standard_weights(standard.eval(), ids)


def window_visible(module: LongformerAttention, inputs: AttentionInputs) -> torch.Tensor:
    """The mask a longformer layer attends under (the one its ``masked`` implementation uses)."""
    return window_mask(inputs, module.window, module.n_global)


@contextmanager
def recomputed_weights(
    modules: Sequence[A], visible: Callable[[A, AttentionInputs], torch.Tensor]
) -> Iterator[list[torch.Tensor]]:
    """Wrap each module's ``attend`` so it also records ``softmax(masked_scores)`` under ``visible``."""
    records: list[torch.Tensor] = []

    def wrap(module: A) -> Callable[..., torch.Tensor]:
        original = module.attend

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
            scores = masked_scores(q, k, inputs, visible(module, inputs))
            records.append(torch.softmax(scores, dim=-1).detach())
            return original(q, k, v, inputs)

        return attend

    for module in modules:
        module.__dict__["attend"] = wrap(module)  # an instance attribute shadowing the method, deleted below
    try:
        yield records
    finally:
        for module in modules:
            del module.attend


def longformer_weights(model: DecoderTransformer, ids: torch.Tensor) -> torch.Tensor:
    modules = cast("list[LongformerAttention]", attention_modules(model))  # called for attention=longformer only
    with torch.no_grad(), recomputed_weights(modules, window_visible) as records:
        model(ids)
    return torch.stack([weights[0] for weights in records])


WEIGHT_SOURCES: dict[str, Callable[[DecoderTransformer, torch.Tensor], torch.Tensor]] = {
    "standard": standard_weights,
    "sdpa": as_standard_weights,
    "longformer": longformer_weights,
}
WEIGHT_NOTES = {
    "sdpa": "attention=sdpa: weights recorded by the same model rebuilt with attention=standard (same function)",
    "longformer": "attention=longformer: its own sliding-window weights (zero outside the window of each query), "
    "not standard attention's",
}
NO_WEIGHTS = {
    "linformer": "attention=linformer has no per-position attention map: each query attends to its own block "
    "and to k learned summaries that each mix every earlier position (through the projections E, F), so its "
    "weights are not a distribution over input tokens; draw the map with attention=standard, sdpa or longformer",
}


def attention_weights(model: DecoderTransformer, ids: torch.Tensor) -> torch.Tensor:
    """``(layers, heads, T, T)`` attention weights of batch element 0, for the attentions that have them."""
    name = model.config.attention["name"]
    if name not in WEIGHT_SOURCES:
        raise ValueError(NO_WEIGHTS.get(name, f"attention={name}: no attention map for this attention type"))
    return WEIGHT_SOURCES[name](model, ids)


def _short(label: str) -> str:
    return label if len(label) <= MAX_TICK_LABEL else label[: MAX_TICK_LABEL - 1] + "~"


def save_attention_png(weights: torch.Tensor, tokens: list[str], path: Path, title: str) -> Path:
    """A ``layers x heads`` grid of heatmaps (query rows, key columns, both labelled by the input tokens)."""
    layers, heads, length, _ = weights.shape
    panel = min(2.4 + 0.02 * length, 5.0)
    figure = Figure(figsize=(2.2 + (panel + 0.2) * heads, 0.6 + panel * layers), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(layers, heads, squeeze=False)
    step = math.ceil(length / MAX_TICKS)  # long inputs: label every step-th token
    ticks = list(range(0, length, step))
    labels = [_short(tokens[i]) for i in ticks]
    image = None
    for (layer, head), ax in zip(((i, j) for i in range(layers) for j in range(heads)), axes.flat, strict=True):
        image = ax.imshow(weights[layer, head].float().numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"layer {layer}, head {head}", fontsize=9)
        ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    assert image is not None  # a model has at least one layer and head
    figure.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
