"""Tests for TextDataModule (tiny_decoder.data.text): batches and loaders, bytes per token for bits per byte,
errors that name the field, and the cache directory's default."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.data.text_helpers import CONTEXT, VOCAB, make_dm
from tiny_decoder.data.text import TextDataModule
from tiny_decoder.training.metrics import bits_per_byte

pytestmark = pytest.mark.usefixtures("offline")


def test_batches_and_loaders(small_dm, tmp_path):
    batch = next(iter(small_dm.train_dataloader()))
    assert set(batch) == {"input", "target"}
    assert batch["input"].shape == (8, CONTEXT) and batch["input"].dtype == torch.long
    assert batch["target"].dtype == torch.long
    again = next(iter(small_dm.train_dataloader()))
    assert torch.equal(batch["input"], again["input"])  # seeded shuffle
    small_dm.trainer = SimpleNamespace(current_epoch=1)  # loaders rebuilt at a later epoch reshuffle
    later = next(iter(small_dm.train_dataloader()))
    small_dm.trainer = None
    assert not torch.equal(batch["input"], later["input"])
    val = next(iter(small_dm.val_dataloader()))
    first_blocks = torch.stack([small_dm.datasets["validation"][i]["input"] for i in range(8)])
    assert torch.equal(val["input"], first_blocks)  # validation is not shuffled
    assert small_dm.vocab_size == VOCAB and small_dm.tokenizer.get_vocab_size() == VOCAB
    assert small_dm.context_length == CONTEXT


def test_bits_per_byte_of_a_split_from_its_bytes_per_token(small_dm):
    stats = small_dm.split_stats["validation"]
    assert small_dm.bytes_per_token["validation"] == pytest.approx(stats["bytes"] / stats["tokens"])
    one_bit_per_token = math.log(2)
    bpb = bits_per_byte(one_bit_per_token, small_dm.bytes_per_token["validation"])
    assert bpb == pytest.approx(stats["tokens"] / stats["bytes"])


def test_missing_file_names_the_field(tmp_path):
    missing = tmp_path / "nope.txt"
    dm = make_dm(tmp_path, files={"train": str(missing)})
    with pytest.raises(FileNotFoundError, match="data.files.train") as err:
        dm.setup()
    assert str(missing) in str(err.value)


def test_vocab_smaller_than_bytes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.vocab_size"):
        make_dm(tmp_path, files={"train": "x.txt"}, vocab_size=256)


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_DECODER_CACHE", str(tmp_path / "env_cache"))
    dm = TextDataModule(files={"train": "x.txt"})
    assert dm.cache_root == tmp_path / "env_cache"
