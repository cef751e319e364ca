"""Shared pieces of the text data tests (test_text.py, test_text_formats.py, test_token_cache.py): the shared
data files, a small TextDataModule factory and story-file writer; the fixtures are in conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_decoder.data.text import EOT_TOKEN, TextDataModule

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STORIES_FILE = DATA_DIR / "tinystories" / "tinystories_v2_train_head.txt"
SHAKESPEARE_FILE = DATA_DIR / "shakespeare" / "input.txt"
VOCAB = 320
CONTEXT = 64


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"missing shared data file {path}")
    return path


def write_stories(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(f"{doc}\n{EOT_TOKEN}\n" for doc in docs), encoding="utf-8")
    return path


def make_dm(tmp_path: Path, **overrides) -> TextDataModule:
    kwargs = dict(vocab_size=VOCAB, context_length=CONTEXT, batch_size=8, cache_dir=str(tmp_path / "cache"))
    return TextDataModule(**{**kwargs, **overrides})


def all_blocks(dataset) -> torch.Tensor:
    return torch.stack([torch.cat([item["input"], item["target"][-1:]]) for item in dataset])
