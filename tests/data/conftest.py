"""Fixtures of the text data tests: offline Hugging Face libraries, the first stories of the shared
TinyStories file, and a small TextDataModule set up on 100 train / 20 validation stories."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests.data.text_helpers import STORIES_FILE, make_dm, require, write_stories  # noqa: E402
from tiny_decoder.data.text import EOT_TOKEN  # noqa: E402


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def stories() -> list[str]:
    text = require(STORIES_FILE).read_text(encoding="utf-8")
    return [s.strip() for s in text.split(EOT_TOKEN)[:120] if s.strip()]


@pytest.fixture
def small_dm(tmp_path, stories):
    files = {
        "train": str(write_stories(tmp_path / "train.txt", stories[:100])),
        "validation": str(write_stories(tmp_path / "val.txt", stories[100:])),
    }
    dm = make_dm(tmp_path, files=files)
    dm.setup()
    return dm
