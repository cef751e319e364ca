"""Documents -> token blocks, cached on disk: every split's documents streamed through the tokenizer into one
token file (the EOT id after each document where the format asks for it, `data/token_stream.py`), packed into
non-overlapping blocks of ``context_length + 1`` tokens (`PackedBlocks`), and the on-disk cache of those files.

Cache layout under the cache root (``$TINY_DECODER_CACHE`` or ~/.cache/tiny_decoder):
``tokenizers/<key>/tokenizer.json`` (a trained tokenizer, keyed by the inputs and the vocab size) and
``packed/<key>/{<split>.bin, meta.json}`` (raw uint16 / uint32 token ids, their dtype and docs / tokens / bytes,
keyed by the inputs, the tokenizer's fingerprint and the context length). The inputs' fingerprint
(`cache_key_inputs`) covers the source files (path, size, mtime) or the Hub dataset's name and revision, the
text format, its separators (the EOT marker, the plain format's chunk size), the validation hold-out and the
train-document cap; the tokenizer's fingerprint covers its vocabulary and merges.

A cache is built in ``packed/<key>.tmp-<pid>`` and renamed into place with meta.json written last: a build
stopped by Ctrl+C removes its folder, one killed outright leaves a ``.tmp-`` folder that no run reads and the
next build removes (its process is gone). Nothing else is left beside the token files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.data import tokenizer as tokenizer_lib
from tiny_decoder.data.text_formats import EOT_TOKEN, PLAIN_CHUNK_CHARS, Documents
from tiny_decoder.data.token_stream import TokenFileWriter, available_cores, encode_batches, token_dtype

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: streamed, raw uint16 / uint32 .bin files
META_FILE = "meta.json"
TMP_MARK = ".tmp-"
KEY_CHARS = 16
ENCODE_BATCH_DOCS = 1000
BYTES_PER_TOKEN_GUESS = 2  # the token file's first allocation: bytes of text / this (grown when short)


# ----------------------------------------------------------------------------- keys


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:KEY_CHARS]


def _file_signature(path: Path) -> list:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def source_fingerprint(
    files: dict[str, list[Path]] | None, hub_dataset: str | None, hub_revision: str | None = None
) -> dict:
    """What identifies the source text: each split's files (path, size, mtime), or the Hub dataset's name and
    revision."""
    if files is None:
        return {"hub": hub_dataset, "revision": hub_revision}
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
        "plain_chunk_chars": PLAIN_CHUNK_CHARS,
    }


def tokenizer_cache_path(cache_root: Path, key_inputs: dict, vocab_size: int) -> Path:
    """Where the tokenizer trained on these inputs with this vocab size is kept."""
    key = _digest({**key_inputs, "vocab_size": vocab_size})
    return cache_root / "tokenizers" / key / "tokenizer.json"


def packed_cache_path(cache_root: Path, key_inputs: dict, tokenizer_fingerprint: str, context_length: int) -> Path:
    """The folder of the token files of these inputs, tokenizer and context length."""
    key = _digest({**key_inputs, "tokenizer": tokenizer_fingerprint, "context_length": context_length})
    return cache_root / "packed" / key


# ----------------------------------------------------------------------------- tokenizing


def _check_enough_tokens(split: str, n_tokens: int, context_length: int) -> None:
    needed = context_length + 1
    if n_tokens < needed:
        raise ConfigError(
            f"split {split!r} has only {n_tokens} tokens, but one block needs data.context_length + 1 = "
            f"{needed}: use more text or a smaller data.context_length"
        )


def write_split(
    path: Path, docs: Documents, tokenizer, *, append_eot: bool, workers: int, expected_bytes: int = 0
) -> dict[str, int]:
    """Tokenize one split's documents straight into the token file ``path``; its docs / tokens / bytes."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    suffix = [tokenizer_lib.eot_id(tokenizer, EOT_TOKEN)] if append_eot else []
    writer = TokenFileWriter(path, dtype, capacity=expected_bytes // BYTES_PER_TOKEN_GUESS)
    n_docs = n_bytes = 0
    for batch in encode_batches(tokenizer, docs.batches(ENCODE_BATCH_DOCS), suffix, dtype, workers):
        writer.write(batch.ids)
        n_docs, n_bytes = n_docs + batch.docs, n_bytes + batch.n_bytes
    return {"docs": n_docs, "tokens": writer.close(), "bytes": n_bytes}


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_abandoned_builds(cache_path: Path) -> list[Path]:
    """Delete the ``<key>.tmp-<pid>`` folders beside ``cache_path`` whose process is gone (killed builds)."""
    removed = []
    for tmp in cache_path.parent.glob(f"*{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        log.info("token cache: removed %d abandoned build(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def build_cache(
    cache_path: Path,
    docs: dict[str, Documents],
    tokenizer,
    tokenizer_fingerprint: str,
    *,
    context_length: int,
    append_eot: bool,
    num_proc: int | None,
    expected_bytes: dict[str, int] | None = None,
) -> None:
    """Tokenize every split of ``docs`` into ``cache_path`` (see the module docstring for how a stopped build is
    never taken for a finished one; when another process finished the same cache first, its copy stays).
    ``num_proc``: tokenizing threads, None for the cores; ``expected_bytes``: a split's text size, if known."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(cache_path)
    tmp = cache_path.with_name(f"{cache_path.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    workers = num_proc or available_cores()
    log.info("tokenizing %s on %d threads -> %s", ", ".join(docs), workers, cache_path)
    started = time.perf_counter()
    try:
        splits = {}
        for split, split_docs in docs.items():
            stats = write_split(
                tmp / f"{split}.bin",
                split_docs,
                tokenizer,
                append_eot=append_eot,
                workers=workers,
                expected_bytes=(expected_bytes or {}).get(split, 0),
            )
            _check_enough_tokens(split, stats["tokens"], context_length)
            splits[split] = stats
        meta = {
            "version": CACHE_VERSION,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "context_length": context_length,
            "dtype": token_dtype(tokenizer.get_vocab_size()).name,
            "splits": splits,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    except BaseException:  # Ctrl+C included: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - started
    counts = ", ".join(f"{split} {stats['tokens']:,} tokens" for split, stats in splits.items())
    total_mb = sum(stats["bytes"] for stats in splits.values()) / 1e6
    log.info("token cache built: %s in %.1f s (%.2f MB/s of text)", counts, elapsed, total_mb / max(elapsed, 1e-9))
    try:
        os.replace(tmp, cache_path)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def is_cached(cache_path: Path) -> bool:
    return (cache_path / META_FILE).exists()


def load_meta(cache_path: Path) -> dict:
    return json.loads((cache_path / META_FILE).read_text())


def load_split_stats(cache_path: Path) -> dict[str, dict]:
    """``{split: {"docs", "tokens", "bytes"}}`` of a built cache."""
    return load_meta(cache_path)["splits"]


def load_tokens(cache_path: Path, split: str) -> np.ndarray:
    """One split's token ids, memory-mapped read-only."""
    return np.memmap(cache_path / f"{split}.bin", dtype=np.dtype(load_meta(cache_path)["dtype"]), mode="r")
