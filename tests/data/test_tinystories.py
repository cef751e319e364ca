"""Tests for TextDataModule: formats, packing, on-disk cache reuse, bits-per-byte and error messages."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_decoder.data import tokenizer as tokenizer_lib  # noqa: E402
from tiny_decoder.data.tinystories import EOT_TOKEN, TextDataModule, bits_per_byte, chunk_lines  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STORIES_FILE = DATA_DIR / "tinystories" / "tinystories_v2_train_head.txt"
SHAKESPEARE_FILE = DATA_DIR / "shakespeare" / "input.txt"
VOCAB = 320
CONTEXT = 64


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"missing shared data file {path}")
    return path


@pytest.fixture(scope="module")
def stories() -> list[str]:
    text = require(STORIES_FILE).read_text(encoding="utf-8")
    return [s.strip() for s in text.split(EOT_TOKEN)[:120] if s.strip()]


def write_stories(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(f"{doc}\n{EOT_TOKEN}\n" for doc in docs), encoding="utf-8")
    return path


def make_dm(tmp_path: Path, **overrides) -> TextDataModule:
    kwargs = dict(vocab_size=VOCAB, context_length=CONTEXT, batch_size=8, cache_dir=str(tmp_path / "cache"))
    return TextDataModule(**{**kwargs, **overrides})


@pytest.fixture
def small_dm(tmp_path, stories):
    files = {
        "train": str(write_stories(tmp_path / "train.txt", stories[:100])),
        "validation": str(write_stories(tmp_path / "val.txt", stories[100:])),
    }
    dm = make_dm(tmp_path, files=files)
    dm.setup()
    return dm


def all_blocks(dataset) -> torch.Tensor:
    return torch.stack([torch.cat([item["input"], item["target"][-1:]]) for item in dataset])


# ----------------------------------------------------------------------------- packing and batches


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


def test_max_val_blocks_caps_validation(tmp_path, stories, small_dm):
    files = {"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "val.txt")}
    capped = make_dm(tmp_path, files=files, max_val_blocks=3)
    capped.setup()
    assert capped.cache_hit  # the cap is applied when loading, not baked into the cache
    assert len(capped.datasets["validation"]) == 3
    assert len(capped.datasets["train"]) == len(small_dm.datasets["train"])


# ----------------------------------------------------------------------------- cache


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
        patch.setattr(datasets.Dataset, "map", forbidden)
        patch.setattr(datasets, "load_dataset", forbidden)
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


# ----------------------------------------------------------------------------- bits per byte


def test_bits_per_byte_from_a_known_loss(tmp_path):
    assert bits_per_byte(math.log(2), n_tokens=100, n_bytes=200) == pytest.approx(0.5)
    assert float(bits_per_byte(torch.tensor(math.log(2)), 100, 200)) == pytest.approx(0.5)
    dm = make_dm(tmp_path, files={"train": "unused.txt"})
    dm.bytes_per_token = {"validation": 2.0}
    assert dm.bits_per_byte(math.log(2)) == pytest.approx(0.5)
    with pytest.raises(KeyError, match="test"):
        dm.bits_per_byte(1.0, split="test")


# ----------------------------------------------------------------------------- formats


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
    monkeypatch.setattr(datasets, "load_dataset", lambda name: requested.append(name) or fake)
    dm = make_dm(tmp_path, hub_dataset="someone/stories")
    dm.setup()
    assert requested == ["someone/stories"]
    assert dm.split_stats["validation"]["docs"] == len(stories) - 100


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_the_field(tmp_path):
    missing = tmp_path / "nope.txt"
    dm = make_dm(tmp_path, files={"train": str(missing)})
    with pytest.raises(FileNotFoundError, match="data.files.train") as err:
        dm.setup()
    assert str(missing) in str(err.value)


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


def test_vocab_smaller_than_bytes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.vocab_size"):
        make_dm(tmp_path, files={"train": "x.txt"}, vocab_size=256)


def test_unknown_text_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.text_format"):
        make_dm(tmp_path, files={"train": "x.txt"}, text_format="markdown")


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_DECODER_CACHE", str(tmp_path / "env_cache"))
    dm = TextDataModule(files={"train": "x.txt"})
    assert dm.cache_root == tmp_path / "env_cache"
