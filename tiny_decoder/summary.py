"""``python -m tiny_decoder.summary +experiment=NAME [input="1 2 4 7"] [attention_png=attn.png] [ckpt=PATH]``.

Builds the configured model (its config exactly as ``train.py`` builds it, or the trained model of
``ckpt=`` via :func:`~tiny_decoder.tasks.load_task`), runs one forward pass with a forward hook on every
submodule and prints a table: module, type, parameters (own and including children; a parameter shared by
two modules, e.g. tied embeddings, is counted once, at its first owner), input shape(s), output shape.

Input: ``input=`` is encoded with the tokenizer when the task (``ckpt=``) or the data module (after
``setup``) exposes one as ``.tokenizer``, otherwise parsed as integers; by default a random sequence of
``context_length`` valid token ids (seeded by ``seed``).

``attention_png=PATH`` saves a grid of attention heatmaps (rows = layers, columns = heads). ``standard``
records its own weights; ``sdpa`` is the same function, so the model is rebuilt with ``attention.name=
standard`` and the same state dict; ``longformer``'s weights are recomputed from its queries and keys with
its sliding-window mask (exactly what its ``masked`` implementation uses); ``linformer`` is refused: its
queries attend to learned summaries that mix many positions, so it has no per-position softmax weights
(``tiny_decoder.analysis.attention_maps``, which the ``AttentionMapLogger`` callback uses too).

This tool was ``tiny_decoder.inspect`` until it was renamed: a module named ``inspect`` shadows the standard
library's whenever the package folder is on ``sys.path``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch import nn

from tiny_decoder.analysis.attention_maps import (
    WEIGHT_NOTES,
    attention_weights,
    save_attention_png,
    token_label,
    tokenizer_of,
)
from tiny_decoder.cli import hydra_tool
from tiny_decoder.core.checks import parse_integers
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.run.config_checks import build_model_config
from tiny_decoder.tasks import load_task

ROOT_NAME = "(model)"
MAX_TITLE = 100
PIPED_WIDTH = 160


@dataclass
class ModelSummary:
    """What ``inspect`` computed: the table rows, the input tokens and the attention weights it drew."""

    rows: list[dict[str, Any]]
    tokens: list[str]
    ids: torch.Tensor
    attention: torch.Tensor | None = None  # (layers, heads, T, T), batch element 0
    attention_png: Path | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# Model and input
# --------------------------------------------------------------------------------------------------------


def build_model(cfg: DictConfig) -> tuple[DecoderTransformer, Any]:
    """The model (fresh, seeded init; or the checkpoint's) and the source of a tokenizer (task or data)."""
    if cfg.get("ckpt"):
        task = load_task(str(cfg.ckpt))
        return task.model.eval(), task if tokenizer_of(task) is not None else None
    datamodule = instantiate(cfg.data, _convert_="all")
    torch.manual_seed(int(cfg.seed))
    model = DecoderTransformer(ModelConfig.from_dict(build_model_config(cfg, datamodule)))
    return model.eval(), datamodule


def find_tokenizer(source: Any, cfg: DictConfig) -> Any | None:
    """``source.tokenizer`` (a task has it at once, a data module after ``setup``), else the data module of
    ``cfg``'s; None when there is none (integer input)."""
    if source is None:
        source = instantiate(cfg.data, _convert_="all")
    if tokenizer_of(source) is None and hasattr(source, "setup"):
        source.setup("fit")
    return tokenizer_of(source)


def encode(tokenizer: Any, text: str) -> tuple[list[int], list[str]]:
    """Token ids and their labels, with a ``tokenizers.Tokenizer`` or anything whose ``encode`` returns ids."""
    encoded = tokenizer.encode(text)
    ids = list(getattr(encoded, "ids", encoded))
    return ids, [token_label(tokenizer, i) for i in ids]


def integer_tokens(text: str) -> tuple[list[int], list[str]]:
    """Token ids typed as numbers (a task without a tokenizer) and their labels."""
    ids = parse_integers("input", text, " (this task has no tokenizer)")
    return ids, [str(i) for i in ids]


def check_ids(ids: list[int], config: ModelConfig, text: str) -> None:
    if not ids:
        raise ValueError(f"input={text!r} encodes to no tokens")
    if len(ids) > config.context_length:
        raise ValueError(f"input={text!r} has {len(ids)} tokens; the model takes at most {config.context_length}")
    if any(not 0 <= i < config.vocab_size for i in ids):
        raise ValueError(f"input={text!r}: every token id must lie in [0, {config.vocab_size - 1}]")


def input_ids(cfg: DictConfig, config: ModelConfig, tokenizer_source: Any) -> tuple[torch.Tensor, list[str]]:
    """``(1, T)`` ids from ``cfg.input``, or ``context_length`` random valid ids seeded by ``cfg.seed``."""
    if cfg.get("input") is None:
        generator = torch.Generator().manual_seed(int(cfg.seed))
        ids = torch.randint(0, config.vocab_size, (1, config.context_length), generator=generator)
        return ids, [str(i) for i in ids[0].tolist()]
    text = str(cfg.input)
    tokenizer = find_tokenizer(tokenizer_source, cfg)
    token_ids, tokens = encode(tokenizer, text) if tokenizer is not None else integer_tokens(text)
    check_ids(token_ids, config, text)
    return torch.tensor([token_ids], dtype=torch.long), tokens


# --------------------------------------------------------------------------------------------------------
# Shapes and parameters
# --------------------------------------------------------------------------------------------------------


def describe(value: Any) -> Any:
    """A tensor -> its shape tuple; a tuple/list -> a list of descriptions; anything else -> its type name."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return [describe(item) for item in value]
    return type(value).__name__


@dataclass
class CallRecord:
    inputs: list[Any]
    output: Any
    calls: int = 1


@contextmanager
def record_calls(model: nn.Module) -> Iterator[dict[str, CallRecord]]:
    """Forward hooks on every module (root included): name -> shapes of its first call and a call count."""
    records: dict[str, CallRecord] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if name in records:
                records[name].calls += 1
                return
            inputs = [describe(a) for a in (*args, *kwargs.values()) if a is not None]
            records[name] = CallRecord(inputs, describe(output))

        return hook

    handles = [module.register_forward_hook(hook_for(name), with_kwargs=True) for name, module in model.named_modules()]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """name -> (own, including children, shared): a tensor shared by several modules (tied embeddings) is
    "own" at its first owner and "shared" at the others, so the own counts add up to the model's total."""
    seen: set[int] = set()
    counts = {}
    for name, module in model.named_modules():
        direct = list(module.parameters(recurse=False))
        own = [p for p in direct if id(p) not in seen]
        seen.update(id(p) for p in own)
        own_count = sum(p.numel() for p in own)
        counts[name] = (
            own_count,
            sum(p.numel() for p in module.parameters()),
            sum(p.numel() for p in direct) - own_count,
        )
    return counts


def inspect_model(model: nn.Module, ids: torch.Tensor) -> list[dict[str, Any]]:
    """One forward pass of ``ids``; one row per module (in ``named_modules`` order, the root first)."""
    with torch.no_grad(), record_calls(model) as records:
        model(ids)
    counts = parameter_counts(model)
    return [_row(name, module, counts[name], records.get(name)) for name, module in model.named_modules()]


def _row(name: str, module: nn.Module, counts: tuple[int, int, int], record: CallRecord | None) -> dict[str, Any]:
    return {
        "name": name or ROOT_NAME,
        "type": type(module).__name__,
        "own_parameters": counts[0],
        "total_parameters": counts[1],
        "shared_parameters": counts[2],
        "input_shapes": record.inputs if record else None,
        "output_shape": record.output if record else None,
        "calls": record.calls if record else 0,
    }


def format_shape(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ")"
    if isinstance(value, list):
        return ", ".join(format_shape(item) for item in value)
    return str(value)


def render_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("module", overflow="fold")
    table.add_column("type", overflow="fold")
    table.add_column("own params", justify="right")
    table.add_column("total params", justify="right")
    table.add_column("input shape(s)")
    table.add_column("output shape")
    for row in rows:
        calls = f" x{row['calls']}" if row["calls"] > 1 else ""
        table.add_row(
            row["name"],
            row["type"],
            f"{row['own_parameters']:,}"
            + (f" (+{row['shared_parameters']:,} tied)" if row["shared_parameters"] else ""),
            f"{row['total_parameters']:,}",
            format_shape(row["input_shapes"]),
            format_shape(row["output_shape"]) + calls,
        )
    return table


# --------------------------------------------------------------------------------------------------------
# Attention weights
# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def default_console() -> Console:
    """The terminal's width, or a wide table when the output is piped (rich would assume 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_WIDTH)


def run_summary(cfg: DictConfig, console: Console | None = None) -> ModelSummary:
    console = console or default_console()
    model, tokenizer_source = build_model(cfg)
    ids, tokens = input_ids(cfg, model.config, tokenizer_source)
    rows = inspect_model(model, ids)
    console.print(render_table(rows, f"{type(model).__name__}: one forward pass of {tuple(ids.shape)} token ids"))
    console.print(f"total parameters: {model.num_parameters():,}")
    summary = ModelSummary(rows=rows, tokens=tokens, ids=ids)
    if cfg.get("attention_png"):
        draw_attention(model, summary, Path(str(cfg.attention_png)), console)
    return summary


def draw_attention(model: DecoderTransformer, summary: ModelSummary, path: Path, console: Console) -> None:
    name = model.config.attention["name"]
    summary.attention = attention_weights(model, summary.ids)
    if name in WEIGHT_NOTES:
        summary.notes.append(WEIGHT_NOTES[name])
        console.print(f"note: {WEIGHT_NOTES[name]}")
    title = textwrap.shorten(f"attention={name}: " + " ".join(summary.tokens), width=MAX_TITLE, placeholder=" ...")
    summary.attention_png = save_attention_png(summary.attention, summary.tokens, path, title)
    console.print(f"attention maps written to {summary.attention_png}")


main = hydra_tool("summary", run_summary)

if __name__ == "__main__":
    main()
