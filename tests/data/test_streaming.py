"""Tests for the streamed preparation (tiny_decoder.data.text_formats readers, data/token_stream.py,
data/token_cache.py): chunked reading gives the whole-file documents and tokens on the shared files, the
uint16 / uint32 token files, an interrupted or killed preparation is redone, nothing but the token files stays
in the cache, and the cache key changes with every input it covers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data.text_helpers import DATA_DIR, SHAKESPEARE_FILE, STORIES_FILE, make_dm, require
from tiny_decoder.data import text_formats, token_cache, token_stream
from tiny_decoder.data import tokenizer as tokenizer_lib
from tiny_decoder.data.text_formats import EOT_TOKEN, chunk_lines
from tiny_decoder.data.token_stream import TokenFileWriter, token_dtype

pytestmark = pytest.mark.usefixtures("offline")

JSON_FILE = DATA_DIR / "tinystories" / "tinystories_3000.json"
SMALL_CHUNK = 997  # characters: many chunk ends inside stories, lines and "\r\n"-free multi-byte text


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    text = require(STORIES_FILE).read_text(encoding="utf-8")
    tokenizer_lib.load_or_train_tokenizer(path, lambda: [text[:300_000]], 320)
    return path


def whole_file_documents(path: Path, fmt: str) -> list[str]:
    """The documents the pre-streaming reader made of a whole file (one row, split in memory)."""
    text = path.read_text(encoding="utf-8")
    if fmt == "plain":
        return chunk_lines(text)
    return [s.strip() for s in text.split(EOT_TOKEN) if s.strip()]


@pytest.mark.parametrize(("path", "fmt"), [(STORIES_FILE, "stories"), (SHAKESPEARE_FILE, "plain")])
def test_chunked_reading_equals_whole_file_documents(monkeypatch, path, fmt):
    require(path)
    monkeypatch.setattr(text_formats, "READ_CHUNK_CHARS", SMALL_CHUNK)
    files = {"train": [path], "validation": [path]}
    reader = text_formats.text_format(fmt)
    docs = text_formats.read_documents(files, None, reader, val_fraction=0.1, max_train_docs=None)
    expected = whole_file_documents(path, fmt)
    assert list(docs["train"]) == expected and docs["train"].count() == len(expected) > 100


def test_json_documents_equal_the_whole_json(tmp_path):
    texts = json.loads(require(JSON_FILE).read_text(encoding="utf-8"))["texts"]
    stories = text_formats.text_format("stories")
    files = {"train": [JSON_FILE], "validation": [JSON_FILE]}
    docs = text_formats.read_documents(files, None, stories, val_fraction=0.1, max_train_docs=None)
    assert list(docs["train"]) == [s.strip() for t in texts for s in t.split(EOT_TOKEN) if s.strip()]


def test_chunked_preparation_equals_whole_file_tokens(tmp_path, monkeypatch, tokenizer_file):
    files = {"train": str(require(STORIES_FILE))}
    whole = make_dm(tmp_path / "whole", files=files, tokenizer_path=str(tokenizer_file), num_proc=1)
    whole.setup()
    monkeypatch.setattr(text_formats, "READ_CHUNK_CHARS", SMALL_CHUNK)
    monkeypatch.setattr(token_stream, "WINDOW_TOKENS", 4099)  # many write windows, file grown while writing
    monkeypatch.setattr(token_cache, "BYTES_PER_TOKEN_GUESS", 1000)
    chunked = make_dm(tmp_path / "chunked", files=files, tokenizer_path=str(tokenizer_file), num_proc=2)
    chunked.setup()
    tok, eot = whole.tokenizer, whole.eot_id
    docs = whole_file_documents(STORIES_FILE, "stories")
    n_docs = len(docs)
    _, val_idx = text_formats._random_holdout(n_docs, 0.05)
    held = set(val_idx.tolist())
    expected = {
        "train": [i for k, d in enumerate(docs) if k not in held for i in [*tok.encode(d).ids, eot]],
        "validation": [i for k, d in enumerate(docs) if k in held for i in [*tok.encode(d).ids, eot]],
    }
    for split in ("train", "validation"):
        assert whole.datasets[split].tokens.dtype == np.uint16
        assert whole.datasets[split].tokens.tolist() == expected[split]
        assert np.array_equal(chunked.datasets[split].tokens, whole.datasets[split].tokens)
    assert whole.split_stats["train"]["docs"] + whole.split_stats["validation"]["docs"] == n_docs


def test_uint16_up_to_65536_ids_then_uint32(tmp_path):
    assert token_dtype(2048) == token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    ids = np.arange(60_000, 70_000, dtype=np.int64)  # beyond uint16
    writer = TokenFileWriter(tmp_path / "t.bin", token_dtype(70_000), capacity=10, window=777)
    for part in np.array_split(ids, 13):
        writer.write(part)
    assert writer.close() == len(ids)
    assert (tmp_path / "t.bin").stat().st_size == 4 * len(ids)  # cut to the ids written
    assert np.array_equal(np.fromfile(tmp_path / "t.bin", dtype=np.uint32), ids)


def cache_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)).split("/", 2)[-1] if "packed" in p.parts else p.name
            for p in root.rglob("*") if p.is_file()}  # fmt: skip


def test_interrupted_preparation_leaves_nothing_and_is_redone(tmp_path, monkeypatch, tokenizer_file):
    files = {"train": str(require(STORIES_FILE))}
    reference = make_dm(tmp_path / "ref", files=files, tokenizer_path=str(tokenizer_file))
    reference.setup()
    calls = []
    original = token_stream.encode_batch

    def ctrl_c_at_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(token_stream, "encode_batch", ctrl_c_at_the_third_batch)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        make_dm(cache, files=files, tokenizer_path=str(tokenizer_file), num_proc=1).setup()
    assert list((cache / "cache" / "packed").iterdir()) == []  # no partial folder
    monkeypatch.setattr(token_stream, "encode_batch", original)
    again = make_dm(cache, files=files, tokenizer_path=str(tokenizer_file))
    again.setup()
    assert again.cache_hit is False
    assert np.array_equal(again.datasets["train"].tokens, reference.datasets["train"].tokens)
    assert cache_files(cache / "cache") == {"train.bin", "validation.bin", "meta.json"}  # no other cache files


def test_killed_preparation_is_not_taken_for_complete(tmp_path, tokenizer_file):
    files = {"train": str(require(STORIES_FILE))}
    first = make_dm(tmp_path, files=files, tokenizer_path=str(tokenizer_file))
    first.setup()
    cache_path = first.cache_path
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = cache_path.with_name(f"{cache_path.name}.tmp-{int(dead.stdout)}")
    cache_path.rename(abandoned)  # what SIGKILL leaves: a full-looking folder under a .tmp- name
    (abandoned / "train.bin").write_bytes(b"\0" * 10)
    again = make_dm(tmp_path, files=files, tokenizer_path=str(tokenizer_file))
    again.setup()
    assert again.cache_hit is False and not abandoned.exists()
    assert len(again.datasets["train"].tokens) == first.split_stats["train"]["tokens"]


BASE_SOURCE = {"train": [["/data/a.txt", 100, 1]]}
KEY_CHANGES = {
    "file size": dict(source={"train": [["/data/a.txt", 101, 1]]}),
    "file mtime": dict(source={"train": [["/data/a.txt", 100, 2]]}),
    "file path": dict(source={"train": [["/data/b.txt", 100, 1]]}),
    "hub name": dict(source={"hub": "a/b", "revision": "r1"}),
    "text format": dict(text_format="plain"),
    "hold-out": dict(holdout=0.1),
    "train-document cap": dict(max_train_docs=10),
    "tokenizer": dict(tokenizer="f" * 16),
    "context length": dict(context_length=128),
}


def packed_key(source=BASE_SOURCE, text_format="stories", holdout=0.05, max_train_docs=None, tokenizer="0" * 16,
               context_length=64) -> Path:  # fmt: skip
    inputs = token_cache.cache_key_inputs(source, text_format, holdout, max_train_docs)
    return token_cache.packed_cache_path(Path("/c"), inputs, tokenizer, context_length)


@pytest.mark.parametrize("change", list(KEY_CHANGES))
def test_cache_key_changes_with_each_input(change):
    assert packed_key(**KEY_CHANGES[change]) != packed_key()


def test_cache_key_covers_hub_revision_separators_and_vocab(monkeypatch, tmp_path):
    hub = token_cache.source_fingerprint(None, "a/b", "r1")
    assert packed_key(source=hub) != packed_key(source=token_cache.source_fingerprint(None, "a/b", "r2"))
    base = packed_key()
    monkeypatch.setattr(token_cache, "EOT_TOKEN", "<|end|>")
    assert packed_key() != base
    monkeypatch.undo()
    monkeypatch.setattr(token_cache, "PLAIN_CHUNK_CHARS", 2048)
    assert packed_key() != base
    inputs = token_cache.cache_key_inputs(BASE_SOURCE, "stories", 0.05, None)
    assert token_cache.tokenizer_cache_path(tmp_path, inputs, 512) != token_cache.tokenizer_cache_path(
        tmp_path, inputs, 1024
    )
    real = tmp_path / "a.txt"
    real.write_text("one")
    before = token_cache.source_fingerprint({"train": [real]}, None)
    real.write_text("three")
    assert token_cache.source_fingerprint({"train": [real]}, None) != before
