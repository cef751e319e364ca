"""Tests for the text formats and readers (tiny_decoder.data.text_formats), through TextDataModule: plain text
with a held-out tail, line-aligned chunks, .json / .jsonl story files, a Hub dataset (pinned revision), an
unknown format."""

from __future__ import annotations

import json

import datasets
import pytest

from tests.data.text_helpers import SHAKESPEARE_FILE, make_dm, require
from tiny_decoder.data.text_formats import PINNED_REVISIONS, chunk_lines

pytestmark = pytest.mark.usefixtures("offline")


def test_plain_format_on_shakespeare_with_val_fraction(tmp_path):
    path = require(SHAKESPEARE_FILE)
    dm = make_dm(tmp_path, files={"train": str(path)}, text_format="plain", val_fraction=0.1, vocab_size=300)
    dm.setup()
    text = path.read_text(encoding="utf-8")
    train, val = (dm.tokenizer.decode(dm.datasets[s].tokens.tolist()) for s in ("train", "validation"))
    assert train + val == text  # contiguous: the tail of the text is held out, no EOT inserted
    assert 0.05 < len(val) / len(text) < 0.15
    assert dm.eot_id not in set(dm.datasets["train"].tokens.tolist())
    assert len(dm.datasets["validation"]) > 0


def test_chunk_lines_keeps_the_text():
    text = "line one\nline two\r\n\nlast line without newline"
    chunks = chunk_lines(text, max_chars=12)
    assert "".join(chunks) == text and len(chunks) > 1


def test_json_and_jsonl_story_files(tmp_path, stories):
    (tmp_path / "train.json").write_text(json.dumps({"texts": stories[:80]}), encoding="utf-8")
    lines = [json.dumps({"text": s}) for s in stories[80:]]
    (tmp_path / "val.jsonl").write_text("\n".join(lines), encoding="utf-8")
    files = {"train": [str(tmp_path / "train.json")], "validation": str(tmp_path / "val.jsonl")}
    dm = make_dm(tmp_path, files=files)
    dm.setup()
    assert dm.split_stats["train"]["docs"] == 80
    assert dm.split_stats["validation"]["docs"] == len(stories) - 80


def test_hub_dataset_path(tmp_path, monkeypatch, stories):
    fake = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": stories[:100]}),
        validation=datasets.Dataset.from_dict({"text": ["  " + s + "\n" for s in stories[100:]]}),
    )
    requested = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, revision: requested.append((name, revision)) or fake)
    dm = make_dm(tmp_path, hub_dataset="someone/stories", hub_revision="abc123")
    dm.setup()
    assert requested == [("someone/stories", "abc123")]
    assert dm.split_stats["validation"]["docs"] == len(stories) - 100
    assert dm.split_stats["train"]["docs"] == 100


def test_hub_route_pins_a_revision_by_default(tmp_path):
    assert make_dm(tmp_path).hub_revision == PINNED_REVISIONS["roneneldan/TinyStories"]  # the class default
    assert len(PINNED_REVISIONS["roneneldan/TinyStories"]) == 40  # a commit, not a branch
    assert make_dm(tmp_path, hub_dataset="someone/other").hub_revision == "main"
    assert make_dm(tmp_path, files={"train": "x.txt"}).hub_revision is None  # files: no Hub revision


def test_unknown_text_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.text_format"):
        make_dm(tmp_path, files={"train": "x.txt"}, text_format="markdown")
