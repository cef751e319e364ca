"""Tests for tokenizing, packing and the on-disk token cache (tiny_decoder.data.token_cache), through
TextDataModule: the blocks reconstruct the document stream, bytes per token, a second setup is a cache hit,
the validation cap is applied at load time, and too little text for one block is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data.text_helpers import CONTEXT, STORIES_FILE, VOCAB, all_blocks, make_dm, require, write_stories
from tiny_decoder.data import text as text_module
from tiny_decoder.data import token_cache
from tiny_decoder.data import tokenizer as tokenizer_lib

pytestmark = pytest.mark.usefixtures("offline")


def test_packing_reconstructs_the_document_stream(small_dm, stories):
    eot = small_dm.eot_id
    expected = [i for doc in stories[:100] for i in small_dm.tokenizer.encode(doc).ids + [eot]]
    dataset = small_dm.datasets["train"]
    block_len = CONTEXT + 1
    assert len(dataset) == len(expected) // block_len
    for item in dataset:
        assert item["input"].shape == item["target"].shape == (CONTEXT,)
        assert torch.equal(item["target"][:-1], item["input"][1:])
    stream = all_blocks(dataset).flatten().tolist()
    assert stream == expected[: len(dataset) * block_len]
    assert small_dm.bytes_per_token["train"] == pytest.approx(
        sum(len(doc.encode("utf-8")) for doc in stories[:100]) / len(expected)
    )


def test_max_val_blocks_caps_validation(tmp_path, stories, small_dm):
    files = {"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "val.txt")}
    capped = make_dm(tmp_path, files=files, max_val_blocks=3)
    capped.setup()
    assert capped.cache_hit  # the cap is applied when loading, not baked into the cache
    assert len(capped.datasets["validation"]) == 3
    assert len(capped.datasets["train"]) == len(small_dm.datasets["train"])


def test_second_setup_is_a_cache_hit_and_context_change_a_miss(tmp_path, monkeypatch):
    files = {"train": str(require(STORIES_FILE))}
    first = make_dm(tmp_path, files=files, max_train_docs=200)
    first.setup()
    assert (first.cache_hit, first.tokenizer_trained) == (False, True)
    assert len(first.datasets["validation"]) > 0

    def forbidden(*args, **kwargs):
        raise AssertionError("a cache hit must not train or tokenize")

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_lib, "train_bpe", forbidden)
        patch.setattr(token_cache, "write_split", forbidden)
        patch.setattr(text_module, "read_documents", forbidden)
        second = make_dm(tmp_path, files=files, max_train_docs=200)
        second.setup()
    assert (second.cache_hit, second.tokenizer_trained) == (True, False)
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint
    for split in ("train", "validation"):
        assert np.array_equal(second.datasets[split].tokens, first.datasets[split].tokens)
    assert second.bytes_per_token == first.bytes_per_token

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_lib, "train_bpe", forbidden)
        other = make_dm(tmp_path, files=files, max_train_docs=200, context_length=CONTEXT // 2)
        other.setup()
    assert (other.cache_hit, other.tokenizer_trained) == (False, False)
    assert other.cache_path != first.cache_path
    assert other.datasets["train"][0]["input"].shape == (CONTEXT // 2,)


def test_too_little_text_for_one_block(tmp_path, stories):
    tokenizer_path = tmp_path / "tokenizer.json"
    tokenizer_lib.load_or_train_tokenizer(tokenizer_path, lambda: stories, VOCAB)
    files = {
        "train": str(write_stories(tmp_path / "train.txt", stories[:20])),
        "validation": str(write_stories(tmp_path / "val.txt", ["A very short story."])),
    }
    dm = make_dm(tmp_path, files=files, tokenizer_path=str(tokenizer_path))
    with pytest.raises(ValueError, match=r"'validation' has only \d+ tokens.*context_length"):
        dm.setup()
