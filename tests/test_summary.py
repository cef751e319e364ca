"""``tiny_decoder.summary`` (was ``inspect``): the per-module table of a real composed config, the attention
maps (standard, sdpa rebuilt as standard, longformer's window, linformer refused), tokenizer input and checkpoints."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig
from rich.console import Console
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from tiny_decoder.analysis.attention_maps import attention_weights
from tiny_decoder.cli import run_cli
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.summary import build_model, input_ids, run_summary
from tiny_decoder.tasks.checkpoint import metadata
from tiny_decoder.tasks.sequence_predictor import SequencePredictor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEQUENCE = "1 2 4 7 11 16"
T = len(SEQUENCE.split())


@pytest.fixture
def summary_config(compose_config: Callable[..., DictConfig]) -> Callable[..., DictConfig]:
    """The real configs: the seed experiment with the small model (d_model 64, 4 heads, 3 layers)."""

    def _compose(*overrides: str) -> DictConfig:
        return compose_config("+experiment=sequence_seed", "model=seq_small", *overrides, config_name="summary")

    return _compose


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def _check_weights(weights: torch.Tensor, layers: int, heads: int, length: int) -> None:
    assert weights.shape == (layers, heads, length, length)
    assert torch.all(weights.triu(diagonal=1) == 0)  # causal: no query sees a later key
    torch.testing.assert_close(weights.sum(-1), torch.ones(layers, heads, length))


def test_table_parameters_and_shapes(summary_config: Callable[..., DictConfig]) -> None:
    cfg = summary_config(f"input={SEQUENCE}")
    rows = {row["name"]: row for row in run_summary(cfg, _quiet()).rows}
    model, _ = build_model(cfg)
    total = model.num_parameters()
    assert rows["(model)"]["total_parameters"] == total
    assert sum(row["own_parameters"] for row in rows.values()) == total
    assert rows["head"]["output_shape"] == (1, T, 256)
    assert rows["(model)"]["input_shapes"] == [(1, T)]
    for layer in range(3):
        block = rows[f"blocks.{layer}"]
        assert block["type"] == "Block" and block["input_shapes"][0] == (1, T, 64)
        assert block["output_shape"] == (1, T, 64)
        assert block["total_parameters"] == sum(p.numel() for p in model.blocks[layer].parameters())
    assert rows["blocks.0.attn.qkv"]["output_shape"] == (1, T, 192)
    assert rows["blocks.0.dropout"]["calls"] == 2  # the block's dropout follows attention and feed-forward


def test_tied_embeddings_counted_once(summary_config: Callable[..., DictConfig]) -> None:
    rows = run_summary(summary_config("model.tie_embeddings=true"), _quiet()).rows
    by_name = {row["name"]: row for row in rows}
    assert by_name["head"]["own_parameters"] == 0 and by_name["head"]["total_parameters"] == 256 * 64
    assert sum(row["own_parameters"] for row in rows) == by_name["(model)"]["total_parameters"]
    assert by_name["(model)"]["output_shape"] == (1, 8, 256)  # default input: context_length random tokens


def test_attention_png_standard(summary_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    png = tmp_path / "maps" / "attn.png"
    summary = run_summary(summary_config("attention=standard", f"input={SEQUENCE}", f"attention_png={png}"), _quiet())
    assert summary.attention_png == png and png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    _check_weights(summary.attention, layers=3, heads=4, length=T)
    assert summary.tokens == SEQUENCE.split()


def test_sdpa_map_comes_from_an_equivalent_standard_model(summary_config: Callable[..., DictConfig]) -> None:
    cfg = summary_config("attention=sdpa")
    model, _ = build_model(cfg)
    ids = torch.tensor([[1, 2, 4, 7, 11]])
    weights = attention_weights(model, ids)
    _check_weights(weights, layers=3, heads=4, length=5)
    standard = DecoderTransformer(ModelConfig.from_dict({**model.config.to_dict(), "attention": {"name": "standard"}}))
    standard.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(standard.eval()(ids), model(ids))


def test_longformer_map_is_its_window(summary_config: Callable[..., DictConfig]) -> None:
    model, _ = build_model(summary_config("attention=longformer", "attention.window=3"))
    weights = attention_weights(model, torch.arange(8).unsqueeze(0))
    _check_weights(weights, layers=3, heads=4, length=8)
    assert torch.all(weights.tril(diagonal=-3) == 0) and torch.all(weights.diagonal(-2, -2, -1) > 0)
    assert all("attend" not in vars(block.attn) for block in model.blocks)  # the recording wrapper is removed


def test_linformer_map_is_refused_clearly(summary_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    cfg = summary_config("attention=linformer", f"attention_png={tmp_path / 'attn.png'}")
    with pytest.raises(ValueError, match="linformer has no per-position attention map"):
        run_summary(cfg, _quiet())
    with pytest.raises(SystemExit) as exit_info:
        run_cli(run_summary, cfg, _quiet())
    assert exit_info.value.code == 2 and not (tmp_path / "attn.png").exists()


def test_bad_input_is_a_user_error(summary_config: Callable[..., DictConfig]) -> None:
    for text, message in (("1 2 x", "integers"), ("1 2 300", r"\[0, 255\]"), ("1 " * 9, "at most 8")):
        with pytest.raises(ValueError, match=message):
            run_summary(summary_config(f"input='{text}'"), _quiet())


def test_text_input_uses_a_tokenizer(summary_config: Callable[..., DictConfig]) -> None:
    tokenizer = Tokenizer(WordLevel({"once": 3, "upon": 4, "a": 5, "time": 6, "[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    cfg = summary_config("input='once upon a time'")
    ids, tokens = input_ids(cfg, ModelConfig(), SimpleNamespace(tokenizer=tokenizer))
    assert ids.tolist() == [[3, 4, 5, 6]] and tokens == ["once", "upon", "a", "time"]


def test_checkpoint_weights(summary_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    model, _ = build_model(summary_config())
    task = SequencePredictor(model=model.config.to_dict())
    with torch.no_grad():
        task.model.blocks[0].attn.qkv.weight.mul_(50.0)  # sharper attention than a fresh init
    checkpoint = {
        "tiny_decoder": metadata(task.task_name),
        "hyper_parameters": dict(task.hparams),
        "state_dict": task.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "model.ckpt")
    cfg = summary_config(f"ckpt={tmp_path / 'model.ckpt'}", f"attention_png={tmp_path / 'a.png'}")
    summary = run_summary(cfg, _quiet())
    assert summary.rows[0]["total_parameters"] == task.model.num_parameters()
    assert (tmp_path / "a.png").is_file()
    _check_weights(summary.attention, layers=3, heads=4, length=8)
    torch.testing.assert_close(summary.attention, attention_weights(task.model.eval(), summary.ids))
    assert not torch.allclose(summary.attention, attention_weights(model, summary.ids))
