"""Documents -> token ids on disk, streamed: batches of documents encoded in parallel with the Rust tokenizer's
``encode_batch`` (which releases the GIL and spreads each batch over its own threads; ``workers`` threads keep
several batches in flight so Python's share of the work overlaps the Rust one), the ids written in order as
uint16 (uint32 when the vocabulary needs it) into a preallocated memory-mapped file through a sliding window,
so memory stays flat however long the stream is.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

WINDOW_TOKENS = 1 << 24  # tokens mapped at once while writing (32 MiB of uint16)
UINT16_VOCAB = 1 << 16


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_VOCAB else np.dtype(np.uint32)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


class TokenFileWriter:
    """Token ids appended to ``path``: the file is preallocated (sparse) to ``capacity`` tokens, grown by doubling
    when full and cut to the written length by `close`; ids go in through a memory map of at most
    :data:`WINDOW_TOKENS` tokens at a time (the written pages are flushed and unmapped window by window)."""

    def __init__(self, path: Path, dtype: np.dtype, capacity: int, window: int = WINDOW_TOKENS):
        self.path, self.dtype, self.window = Path(path), np.dtype(dtype), window
        self.file = open(self.path, "w+b")  # noqa: SIM115 (closed by close())
        self.capacity = max(1, capacity)
        self.file.truncate(self.capacity * self.dtype.itemsize)
        self.length = 0
        self._map: np.memmap | None = None
        self._map_start = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        while len(ids):
            if self._map is None or self.length >= self._map_start + len(self._map):
                self._next_window()
            assert self._map is not None
            start = self.length - self._map_start
            n = min(len(ids), len(self._map) - start)
            self._map[start : start + n] = ids[:n]
            self.length += n
            ids = ids[n:]

    def _next_window(self) -> None:
        self._unmap()
        if self.length + self.window > self.capacity:
            self.capacity = max(2 * self.capacity, self.length + self.window)
            self.file.truncate(self.capacity * self.dtype.itemsize)
        offset = self.length * self.dtype.itemsize
        self._map = np.memmap(self.file, dtype=self.dtype, mode="r+", offset=offset, shape=(self.window,))
        self._map_start = self.length

    def _unmap(self) -> None:
        if self._map is not None:
            self._map.flush()
            self._map = None  # its last reference: unmapped now

    def close(self) -> int:
        """Flush, cut the file to the ids written, fsync; returns the number of ids."""
        self._unmap()
        self.file.truncate(self.length * self.dtype.itemsize)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.length


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, with at most 2 x workers items in flight (the input is
    consumed as the results are, so memory stays bounded; `Executor.map` would submit everything at once)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="tokenize") as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class EncodedBatch:
    """One batch of documents as a run of token ids (``suffix`` after each document) and its sizes."""

    ids: np.ndarray
    docs: int
    n_bytes: int


def encode_batch(tokenizer, docs: list[str], suffix: list[int], dtype: np.dtype) -> EncodedBatch:
    """``tokenizer.encode_batch_fast`` (no offsets) of ``docs``, concatenated with ``suffix`` after each."""
    encodings = tokenizer.encode_batch_fast(docs)
    ids = np.fromiter(itertools.chain.from_iterable(enc.ids + suffix for enc in encodings), dtype=dtype)
    return EncodedBatch(ids, len(docs), sum(len(doc.encode("utf-8")) for doc in docs))


def encode_batches(
    tokenizer, batches: Iterable[list[str]], suffix: list[int], dtype: np.dtype, workers: int
) -> Iterator[EncodedBatch]:
    """Every batch encoded (see `encode_batch`), in order, on ``workers`` threads."""
    return ordered_map(lambda docs: encode_batch(tokenizer, docs, suffix, dtype), batches, workers)
