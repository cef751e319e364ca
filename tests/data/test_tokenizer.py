"""Tests for the byte-level BPE helpers in tiny_decoder.data.tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_decoder.data.tokenizer import (
    DEFAULT_EOT,
    eot_id,
    load_or_train_tokenizer,
    tokenizer_fingerprint,
    train_bpe,
)

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STORIES_FILE = DATA_DIR / "tinystories" / "tinystories_v2_train_head.txt"
VOCAB = 400

TRICKY_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "She said, “I’m happy!” — and smiled…\n\nThe end.\n",
    "café naïve Ångström 日本語 🙂\ttabs\r\nand CRLF",
    "   leading spaces and trailing   ",
    "",
    "two stories<|endoftext|>glued together",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    if not STORIES_FILE.is_file():
        pytest.skip(f"missing shared data file {STORIES_FILE}")
    stories = STORIES_FILE.read_text(encoding="utf-8").split(DEFAULT_EOT)
    return [s.strip() for s in stories[:200] if s.strip()]


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe(corpus, VOCAB)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_eot_is_a_single_id(tokenizer):
    eot = eot_id(tokenizer)
    assert tokenizer.encode(DEFAULT_EOT).ids == [eot]
    assert tokenizer.encode("a story.<|endoftext|>Another").ids.count(eot) == 1


def test_vocab_size_is_honoured(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB


def test_vocab_below_byte_alphabet_is_refused(corpus):
    with pytest.raises(ValueError, match="data.vocab_size"):
        train_bpe(corpus, 256)


def test_fingerprint_identifies_the_tokenizer(tokenizer, corpus):
    from tokenizers import Tokenizer

    same = Tokenizer.from_str(tokenizer.to_str())
    other = train_bpe(corpus, VOCAB - 20)
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    assert len(tokenizer_fingerprint(tokenizer)) == 16


def test_load_or_train_reuses_the_saved_file(tmp_path, corpus):
    path = tmp_path / "tok" / "tokenizer.json"
    calls = []

    def texts():
        calls.append(1)
        return iter(corpus)

    first = load_or_train_tokenizer(path, texts, VOCAB)
    second = load_or_train_tokenizer(path, texts, VOCAB)
    assert path.is_file()
    assert len(calls) == 1
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)


def test_reuse_with_other_vocab_size_raises(tmp_path, corpus):
    path = tmp_path / "tokenizer.json"
    load_or_train_tokenizer(path, lambda: corpus, VOCAB)
    with pytest.raises(ValueError, match="data.vocab_size") as err:
        load_or_train_tokenizer(path, lambda: corpus, VOCAB + 100)
    assert str(path) in str(err.value)


def test_too_little_text_for_the_vocab_raises(tmp_path):
    with pytest.raises(ValueError, match="data.vocab_size"):
        load_or_train_tokenizer(tmp_path / "tokenizer.json", lambda: ["tiny text"], 2048)
    assert not (tmp_path / "tokenizer.json").exists()
