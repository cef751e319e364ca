"""Documents -> token blocks, cached on disk: tokenizing every split with `Dataset.map` into one token stream
(the EOT id after each document where the format asks for it), packing the stream into non-overlapping blocks
of ``context_length + 1`` tokens (`PackedBlocks`), and the on-disk cache of those streams.

Cache layout under the cache root (``$TINY_DECODER_CACHE`` or ~/.cache/tiny_decoder):
``tokenizers/<key>/tokenizer.json`` (a trained tokenizer, keyed by the inputs and the vocab size) and
``packed/<key>/{<split>.npy, meta.json}`` (token streams and their docs / tokens / bytes, keyed by the inputs,
the tokenizer's fingerprint and the context length). The inputs' fingerprint (`cache_key_inputs`) covers the
source files (path, size, mtime) or the Hub dataset's name, the text format, the validation hold-out, the
train-document cap and the EOT marker, so a second run with the same inputs neither retrains the tokenizer nor
re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset as TorchDataset

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.data import tokenizer as tokenizer_lib
from tiny_decoder.data.text_formats import EOT_TOKEN, effective_num_proc

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_ENV_VAR = "TINY_DECODER_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/tiny_decoder"
META_FILE = "meta.json"
KEY_CHARS = 16
MAP_BATCH_SIZE = 1000


# ----------------------------------------------------------------------------- keys


def default_cache_dir() -> Path:
    """`$TINY_DECODER_CACHE` if set, else ~/.cache/tiny_decoder."""
    return Path(os.environ.get(CACHE_ENV_VAR, DEFAULT_CACHE_DIR)).expanduser()


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:KEY_CHARS]


def _file_signature(path: Path) -> list:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def source_fingerprint(files: dict[str, list[Path]] | None, hub_dataset: str | None) -> dict:
    """What identifies the source text: each split's files (path, size, mtime), or the Hub dataset's name."""
    if files is None:
        return {"hub": hub_dataset}
    return {split: [_file_signature(p) for p in paths] for split, paths in files.items()}


def cache_key_inputs(source: dict, text_format: str, holdout: float | None, max_train_docs: int | None) -> dict:
    """Everything before the tokenizer that decides the documents (``holdout``: the validation fraction held
    out of train, None when a validation split is given)."""
    return {
        "version": CACHE_VERSION,
        "source": source,
        "format": text_format,
        "holdout": holdout,
        "max_train_docs": max_train_docs,
        "eot": EOT_TOKEN,
    }


def tokenizer_cache_path(cache_root: Path, key_inputs: dict, vocab_size: int) -> Path:
    """Where the tokenizer trained on these inputs with this vocab size is kept."""
    key = _digest({**key_inputs, "vocab_size": vocab_size})
    return cache_root / "tokenizers" / key / "tokenizer.json"


def packed_cache_path(cache_root: Path, key_inputs: dict, tokenizer_fingerprint: str, context_length: int) -> Path:
    """The folder of the token streams of these inputs, tokenizer and context length."""
    key = _digest({**key_inputs, "tokenizer": tokenizer_fingerprint, "context_length": context_length})
    return cache_root / "packed" / key


# ----------------------------------------------------------------------------- tokenizing


def iter_text_batches(ds: datasets.Dataset) -> Iterator[list[str]]:
    """The "text" column in batches (what the tokenizer trains on)."""
    for batch in ds.iter(batch_size=MAP_BATCH_SIZE):
        yield batch["text"]


def _encode_batch(batch: dict, tokenizer, suffix: list[int]) -> dict:
    encodings = tokenizer.encode_batch(batch["text"])
    return {
        "ids": [enc.ids + suffix for enc in encodings],
        "n_bytes": [len(text.encode("utf-8")) for text in batch["text"]],
    }


def _stream_and_bytes(encoded: datasets.Dataset, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Concatenate the per-document ids into one token stream; also sum the documents' bytes."""
    parts, n_bytes = [], 0
    for table in encoded.with_format("arrow").iter(batch_size=MAP_BATCH_SIZE * 10):
        parts.append(pc.list_flatten(table.column("ids")).to_numpy().astype(dtype))
        n_bytes += pc.sum(table.column("n_bytes")).as_py() or 0
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return stream, n_bytes


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def encode_documents(docs: datasets.Dataset, tokenizer, append_eot: bool, num_proc: int) -> tuple[np.ndarray, int]:
    """One split's documents -> (token stream, UTF-8 bytes of the documents)."""
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    suffix = [tokenizer_lib.eot_id(tokenizer, EOT_TOKEN)] if append_eot else []
    encoded = docs.map(
        _encode_batch,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        fn_kwargs={"tokenizer": tokenizer, "suffix": suffix},
        remove_columns=docs.column_names,
        num_proc=effective_num_proc(num_proc, len(docs)),
        desc="tokenizing",
    )
    return _stream_and_bytes(encoded, _token_dtype(tokenizer.get_vocab_size()))


def _check_enough_tokens(split: str, n_tokens: int, context_length: int) -> None:
    needed = context_length + 1
    if n_tokens < needed:
        raise ConfigError(
            f"split {split!r} has only {n_tokens} tokens, but one block needs data.context_length + 1 = "
            f"{needed}: use more text or a smaller data.context_length"
        )


# ----------------------------------------------------------------------------- packing


class PackedBlocks(TorchDataset):
    """Non-overlapping blocks of context_length + 1 tokens cut from one token stream (remainder dropped).
    Item i is {"input": block[:-1], "target": block[1:]} as int64 tensors."""

    def __init__(self, tokens: np.ndarray, context_length: int, max_blocks: int | None = None):
        self.tokens = tokens
        self.block_len = context_length + 1
        n_blocks = len(tokens) // self.block_len
        self.num_blocks = n_blocks if max_blocks is None else min(n_blocks, max_blocks)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range [0, {self.num_blocks})")
        start = index * self.block_len
        block = torch.from_numpy(self.tokens[start : start + self.block_len].astype(np.int64))
        return {"input": block[:-1], "target": block[1:]}


# ----------------------------------------------------------------------------- the cache on disk


def build_cache(
    cache_path: Path,
    docs: dict[str, datasets.Dataset],
    tokenizer,
    tokenizer_fingerprint: str,
    *,
    context_length: int,
    append_eot: bool,
    num_proc: int,
) -> None:
    """Tokenize every split of ``docs`` and write the streams and meta.json to ``cache_path`` (atomically: a
    temp folder renamed into place; when another process finished the same cache first, its copy stays)."""
    tmp = cache_path.with_name(f"{cache_path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_docs = sum(len(split_docs) for split_docs in docs.values())
    log.info("tokenizing %s documents (%s) -> %s", f"{n_docs:,}", ", ".join(docs), cache_path)
    started = time.perf_counter()
    splits = {}
    for split, split_docs in docs.items():
        stream, n_bytes = encode_documents(split_docs, tokenizer, append_eot, num_proc)
        _check_enough_tokens(split, len(stream), context_length)
        np.save(tmp / f"{split}.npy", stream)
        splits[split] = {"docs": len(split_docs), "tokens": int(len(stream)), "bytes": int(n_bytes)}
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint, "context_length": context_length, "splits": splits}
    counts = ", ".join(f"{split} {stats['tokens']:,} tokens" for split, stats in splits.items())
    log.info("token cache built: %s in %.1f s", counts, time.perf_counter() - started)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, cache_path)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def is_cached(cache_path: Path) -> bool:
    return (cache_path / META_FILE).exists()


def load_split_stats(cache_path: Path) -> dict[str, dict]:
    """``{split: {"docs", "tokens", "bytes"}}`` of a built cache."""
    return json.loads((cache_path / META_FILE).read_text())["splits"]


def load_tokens(cache_path: Path, split: str) -> np.ndarray:
    """One split's token stream, memory-mapped."""
    return np.load(cache_path / f"{split}.npy", mmap_mode="r")
