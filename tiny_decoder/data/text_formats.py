"""Reading text into documents, streamed: the readers of .txt / .json / .jsonl files and of a Hub dataset, the
text formats (``stories``: documents separated by the end-of-text marker; ``plain``: one contiguous text cut into
line-aligned chunks), and holding out a validation fraction of the train documents when no validation file
is given.

Nothing holds a whole file: a .txt is read in chunks of :data:`READ_CHUNK_CHARS` characters (a story or line cut
by a chunk's end is carried into the next, so the documents equal those of the whole text), a .json's
``{"texts": [...]}`` is parsed incrementally (ijson), a .jsonl line by line, a Hub dataset's Arrow rows in
batches. `read_documents` is the one entry: splits of files (or a Hub dataset) -> ``{split: Documents}``, each a
re-iterable sequence of document strings. Tokenizing and packing them is `data/token_cache.py`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import ijson
import numpy as np

from tiny_decoder.core.checks import check, check_number
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

EOT_TOKEN = tokenizer_lib.DEFAULT_EOT
SPLITS = ("train", "validation", "test")
PLAIN_CHUNK_CHARS = 4096
READ_CHUNK_CHARS = 1 << 22  # characters read from a .txt at a time (4 Mi: ~4-16 MB of str)
HUB_BATCH_ROWS = 1000
HOLDOUT_SEED = 1234  # fixed, so the held-out validation docs do not change with the training seed
# revisions the Hub route uses when data.hub_revision is null (a dataset not listed here: its main branch)
PINNED_REVISIONS = {"roneneldan/TinyStories": "f54c09fd23315a6f9c86f9dc80f725de7d8f9c64"}

Text = Iterable[str]  # one contiguous text, in pieces (a file's chunks, or one row: a single piece)


# ----------------------------------------------------------------------------- text -> documents


def split_stories(pieces: Text) -> Iterator[str]:
    """The stories of one text given in pieces: split on the EOT marker (across piece ends), stripped, empty
    ones dropped: the same documents as ``text.split(EOT)`` of the joined text."""
    carry = ""
    for piece in pieces:
        parts = (carry + piece).split(EOT_TOKEN)
        carry = parts.pop()
        yield from (story for story in (part.strip() for part in parts) if story)
    if carry.strip():
        yield carry.strip()


def iter_lines(pieces: Text) -> Iterator[str]:
    """The lines (ends kept) of one text given in pieces: those of ``"".join(pieces).splitlines(True)``."""
    carry = ""
    for piece in pieces:
        lines = (carry + piece).splitlines(keepends=True)
        carry = lines.pop() if lines else ""  # the last line may go on in the next piece
        yield from lines
    if carry:
        yield carry


def chunk_line_stream(lines: Iterable[str], max_chars: int = PLAIN_CHUNK_CHARS) -> Iterator[str]:
    """Greedily join lines into chunks of at most ~max_chars (a longer line is a chunk of its own)."""
    current: list[str] = []
    size = 0
    for line in lines:
        if current and size + len(line) > max_chars:
            yield "".join(current)
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        yield "".join(current)


def chunk_lines(text: str, max_chars: int = PLAIN_CHUNK_CHARS) -> list[str]:
    """Cut text at line ends into chunks of at most ~max_chars; "".join(chunks) == text."""
    return list(chunk_line_stream(text.splitlines(keepends=True), max_chars))


def plain_chunks(pieces: Text) -> Iterator[str]:
    """The line-aligned chunks of one contiguous text given in pieces."""
    return chunk_line_stream(iter_lines(pieces))


# ----------------------------------------------------------------------------- file readers: path -> texts


def read_text_file(path: Path) -> Iterator[Text]:
    """A text file as one text, read in chunks (universal newlines, as `open` and datasets' text loader)."""

    def chunks() -> Iterator[str]:
        with open(path, encoding="utf-8") as file:
            while chunk := file.read(READ_CHUNK_CHARS):
                yield chunk

    yield chunks()


def read_json_texts(path: Path) -> Iterator[Text]:
    """``{"texts": [...]}``: each string a text, parsed incrementally."""
    with open(path, "rb") as file:
        for text in ijson.items(file, "texts.item"):
            yield (text,)


def read_jsonl_texts(path: Path) -> Iterator[Text]:
    """One JSON object a line: its "text" field a text (blank lines skipped)."""
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                yield (json.loads(line)["text"],)


STORY_READERS: dict[str, Callable[[Path], Iterator[Text]]] = {
    ".txt": read_text_file,
    ".json": read_json_texts,
    ".jsonl": read_jsonl_texts,
}


def read_story_file(path: Path) -> Iterator[Text]:
    wanted = f"one of: {', '.join(STORY_READERS)}"
    check(f"the suffix of story file {path}", path.suffix, STORY_READERS.__contains__, wanted)
    return STORY_READERS[path.suffix](path)


# ----------------------------------------------------------------------------- validation hold-out


def _n_holdout(n_docs: int, fraction: float) -> int:
    hint = " when no data.files.validation is given"
    check_number("data.val_fraction", fraction, 0, 1, low_open=True, high_open=True, hint=hint)
    n_val = max(1, round(n_docs * fraction))
    if n_val >= n_docs:
        raise ConfigError(f"cannot hold out data.val_fraction={fraction} of only {n_docs} train documents")
    return n_val


def _random_holdout(n_docs: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Held-out docs drawn with a fixed seed; both sides keep the original order."""
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n_docs)
    n_val = _n_holdout(n_docs, fraction)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _tail_holdout(n_docs: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last chunks of a contiguous text are held out (no neighbouring chunks leak across)."""
    n_train = n_docs - _n_holdout(n_docs, fraction)
    return np.arange(n_train), np.arange(n_train, n_docs)


def _mask(n_docs: int, indices: np.ndarray) -> np.ndarray:
    mask = np.zeros(n_docs, dtype=bool)
    mask[indices] = True
    return mask


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class TextFormat:
    """How one text format is read, cut into documents, separated and split for validation."""

    read_file: Callable[[Path], Iterator[Text]]  # one file -> its texts
    to_documents: Callable[[Text], Iterator[str]]  # one text (in pieces) -> its documents
    append_eot: bool  # append the EOT id after every document
    hold_out: Callable[[int, float], tuple[np.ndarray, np.ndarray]]  # (n docs, fraction) -> train/val idx


TEXT_FORMATS: dict[str, TextFormat] = {
    "stories": TextFormat(read_story_file, split_stories, append_eot=True, hold_out=_random_holdout),
    "plain": TextFormat(read_text_file, plain_chunks, append_eot=False, hold_out=_tail_holdout),
}


def text_format(name: str) -> TextFormat:
    """The format named by ``data.text_format``; ConfigError naming the choices otherwise."""
    check("data.text_format", name, TEXT_FORMATS.__contains__, f"one of: {', '.join(TEXT_FORMATS)}")
    return TEXT_FORMATS[name]


# ----------------------------------------------------------------------------- one split's documents


@dataclass(frozen=True)
class Documents:
    """One split's documents, re-iterable and never all in memory: the documents of ``texts()`` in order, only
    those where ``keep`` is true (a validation hold-out), at most the first ``limit`` (data.max_train_docs)."""

    texts: Callable[[], Iterator[Text]]
    to_documents: Callable[[Text], Iterator[str]]
    keep: np.ndarray | None = None
    limit: int | None = None

    def __iter__(self) -> Iterator[str]:
        docs: Iterator[str] = itertools.chain.from_iterable(map(self.to_documents, self.texts()))
        if self.keep is not None:
            docs = itertools.compress(docs, self.keep)
        return itertools.islice(docs, self.limit)

    def batches(self, size: int) -> Iterator[list[str]]:
        """The documents in lists of ``size`` (the last one shorter)."""
        docs = iter(self)
        while batch := list(itertools.islice(docs, size)):
            yield batch

    def count(self) -> int:
        """The number of documents (one pass over the text)."""
        return sum(1 for _ in self)

    def replace(self, **changes: object) -> Documents:
        return Documents(**{**vars(self), **changes})


def _file_texts(paths: list[Path], fmt: TextFormat) -> Callable[[], Iterator[Text]]:
    return lambda: itertools.chain.from_iterable(fmt.read_file(path) for path in paths)


def _hub_texts(split: datasets.Dataset) -> Callable[[], Iterator[Text]]:
    rows = split.select_columns(["text"])
    return lambda: ((text,) for batch in rows.iter(batch_size=HUB_BATCH_ROWS) for text in batch["text"])


# ----------------------------------------------------------------------------- the Hub


HUB_HOST = "huggingface.co"
LOCAL_FILES_HINT = (
    "pass local files instead: data.files.train=PATH [data.files.validation=PATH] (.txt, .json or .jsonl), or, if "
    "the dataset is already in your Hugging Face cache, set HF_HUB_OFFLINE=1"
)
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def pinned_revision(name: str, revision: str | None) -> str:
    """``data.hub_revision``, or the pinned commit of a known dataset (:data:`PINNED_REVISIONS`), else "main"."""
    if revision:
        return revision
    if name not in PINNED_REVISIONS:
        log.warning("data.hub_dataset=%s: no pinned revision, using its main branch (set data.hub_revision)", name)
    return PINNED_REVISIONS.get(name, "main")


def hub_reachable(host: str = HUB_HOST) -> bool:
    """Whether ``host`` resolves (a quick check: without a network the Hub client retries for ~30 s)."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def load_hub_dataset(name: str, revision: str) -> dict[str, datasets.Dataset]:
    """Every split of the Hub dataset ``name`` at ``revision`` (memory-mapped Arrow in the Hugging Face cache);
    one ConfigError, at once, when it cannot be had."""
    offline = any(os.environ.get(flag, "").lower() in ("1", "true", "yes") for flag in OFFLINE_FLAGS)
    if not offline and not hub_reachable():
        raise ConfigError(
            f"data.hub_dataset={name}: the Hugging Face Hub ({HUB_HOST}) cannot be reached; {LOCAL_FILES_HINT}"
        )
    try:
        return dict(datasets.load_dataset(name, revision=revision))
    except (ConnectionError, OSError, ValueError) as error:  # offline and not cached, unknown name, ...
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ConfigError(f"data.hub_dataset={name}: cannot load it ({reason}); {LOCAL_FILES_HINT}") from error


# ----------------------------------------------------------------------------- reading the splits


def _split_documents(
    files: dict[str, list[Path]] | None, hub_dataset: str | None, revision: str | None, fmt: TextFormat
) -> dict[str, Documents]:
    if files is None:
        name = str(hub_dataset)
        hub = load_hub_dataset(name, pinned_revision(name, revision))
        return {split: Documents(_hub_texts(ds), fmt.to_documents) for split, ds in hub.items() if split in SPLITS}
    return {split: Documents(_file_texts(paths, fmt), fmt.to_documents) for split, paths in files.items()}


def read_documents(
    files: dict[str, list[Path]] | None,
    hub_dataset: str | None,
    fmt: TextFormat,
    *,
    val_fraction: float,
    max_train_docs: int | None,
    hub_revision: str | None = None,
) -> dict[str, Documents]:
    """The documents of every split: from ``files`` (split -> existing paths) or, when None, the Hub dataset.
    Without a validation split a ``val_fraction`` of the train documents is held out (``fmt.hold_out``, after
    one counting pass); the train split is then cut to its first ``max_train_docs`` documents."""
    docs = _split_documents(files, hub_dataset, hub_revision, fmt)
    if "validation" not in docs and "train" in docs:
        train = docs["train"]
        n_docs = train.count()
        train_idx, val_idx = fmt.hold_out(n_docs, val_fraction)
        docs["train"] = train.replace(keep=_mask(n_docs, train_idx))
        docs["validation"] = train.replace(keep=_mask(n_docs, val_idx))
        log.info("data: held out %d of %d train documents for validation", len(val_idx), n_docs)
    if max_train_docs is not None and "train" in docs:
        docs["train"] = docs["train"].replace(limit=max_train_docs)
    return docs
