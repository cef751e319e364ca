"""Reading text into documents: the readers of .txt / .json / .jsonl files and of a Hub dataset, the text
formats (``stories``: documents separated by the end-of-text marker; ``plain``: one contiguous text cut into
line-aligned chunks), and holding out a validation fraction of the train documents when no validation file
is given.

`read_documents` is the one entry: splits of files (or a Hub dataset) -> ``{split: datasets.Dataset}`` with a
"text" column, one row per document. Tokenizing and packing those documents is `data/token_cache.py`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from tiny_decoder.core.checks import check, check_number
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

EOT_TOKEN = tokenizer_lib.DEFAULT_EOT
SPLITS = ("train", "validation", "test")
PLAIN_CHUNK_CHARS = 4096
HOLDOUT_SEED = 1234  # fixed, so the held-out validation docs do not change with the training seed


def effective_num_proc(num_proc: int, n_rows: int) -> int | None:
    """The processes a `Dataset.map` over ``n_rows`` rows uses: None (in-process) unless more than one."""
    n = min(num_proc, n_rows)
    return n if n > 1 else None


# ----------------------------------------------------------------------------- rows -> documents


def _split_stories(batch: dict) -> dict:
    """Batched map: split raw rows on the EOT marker, strip, drop empty stories."""
    stories = (s.strip() for doc in batch["text"] for s in doc.split(EOT_TOKEN))
    return {"text": [s for s in stories if s]}


def chunk_lines(text: str, max_chars: int = PLAIN_CHUNK_CHARS) -> list[str]:
    """Cut text at line ends into chunks of at most ~max_chars; "".join(chunks) == text."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if current and size + len(line) > max_chars:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append("".join(current))
    return chunks


def _chunk_plain(batch: dict) -> dict:
    """Batched map: cut whole-file rows into line-aligned chunks (documents of a contiguous text)."""
    return {"text": [chunk for doc in batch["text"] for chunk in chunk_lines(doc)]}


# ----------------------------------------------------------------------------- file readers


def _read_text_document(path: Path, cache_dir: str | None) -> datasets.Dataset:
    return datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train", cache_dir=cache_dir)


def _read_json_texts(path: Path, cache_dir: str | None) -> datasets.Dataset:
    return datasets.load_dataset("json", data_files=str(path), field="texts", split="train", cache_dir=cache_dir)


def _read_jsonl_text(path: Path, cache_dir: str | None) -> datasets.Dataset:
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    return ds.select_columns(["text"])


STORY_READERS: dict[str, Callable[[Path, str | None], datasets.Dataset]] = {
    ".txt": _read_text_document,
    ".json": _read_json_texts,
    ".jsonl": _read_jsonl_text,
}


def _read_story_file(path: Path, cache_dir: str | None) -> datasets.Dataset:
    wanted = f"one of: {', '.join(STORY_READERS)}"
    check(f"the suffix of story file {path}", path.suffix, STORY_READERS.__contains__, wanted)
    return STORY_READERS[path.suffix](path, cache_dir)


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


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class TextFormat:
    """How one text format is read, cut into documents, separated and split for validation."""

    read_file: Callable[[Path, str | None], datasets.Dataset]  # one file -> rows with a "text" column
    to_documents: Callable[[dict], dict]  # batched map: rows -> documents
    append_eot: bool  # append the EOT id after every document
    hold_out: Callable[[int, float], tuple[np.ndarray, np.ndarray]]  # (n docs, fraction) -> train/val idx


TEXT_FORMATS: dict[str, TextFormat] = {
    "stories": TextFormat(_read_story_file, _split_stories, append_eot=True, hold_out=_random_holdout),
    "plain": TextFormat(_read_text_document, _chunk_plain, append_eot=False, hold_out=_tail_holdout),
}


def text_format(name: str) -> TextFormat:
    """The format named by ``data.text_format``; ConfigError naming the choices otherwise."""
    check("data.text_format", name, TEXT_FORMATS.__contains__, f"one of: {', '.join(TEXT_FORMATS)}")
    return TEXT_FORMATS[name]


# ----------------------------------------------------------------------------- reading the splits


HUB_HOST = "huggingface.co"
LOCAL_FILES_HINT = (
    "pass local files instead: data.files.train=PATH [data.files.validation=PATH] (.txt, .json or .jsonl), or, if "
    "the dataset is already in your Hugging Face cache, set HF_HUB_OFFLINE=1"
)


def hub_reachable(host: str = HUB_HOST) -> bool:
    """Whether ``host`` resolves (a quick check: without a network the Hub client retries for ~30 s)."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def load_hub_dataset(name: str) -> dict[str, datasets.Dataset]:
    """Every split of the Hub dataset ``name``; one ConfigError, at once, when it cannot be had."""
    offline = any(os.environ.get(flag, "").lower() in ("1", "true", "yes") for flag in OFFLINE_FLAGS)
    if not offline and not hub_reachable():
        raise ConfigError(
            f"data.hub_dataset={name}: the Hugging Face Hub ({HUB_HOST}) cannot be reached; {LOCAL_FILES_HINT}"
        )
    try:
        return dict(datasets.load_dataset(name))
    except (ConnectionError, OSError, ValueError) as error:  # offline and not cached, unknown name, ...
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ConfigError(f"data.hub_dataset={name}: cannot load it ({reason}); {LOCAL_FILES_HINT}") from error


OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _read_raw_splits(
    files: dict[str, list[Path]] | None, hub_dataset: str | None, fmt: TextFormat, hf_cache: str
) -> dict[str, datasets.Dataset]:
    if files is None:
        return load_hub_dataset(str(hub_dataset))
    return {
        split: datasets.concatenate_datasets([fmt.read_file(p, hf_cache) for p in paths])
        for split, paths in files.items()
    }


def _to_documents(raw: datasets.Dataset, fmt: TextFormat, num_proc: int) -> datasets.Dataset:
    return raw.map(
        fmt.to_documents,
        batched=True,
        remove_columns=raw.column_names,
        num_proc=effective_num_proc(num_proc, len(raw)),
        desc="documents",
    )


def read_documents(
    files: dict[str, list[Path]] | None,
    hub_dataset: str | None,
    fmt: TextFormat,
    *,
    val_fraction: float,
    max_train_docs: int | None,
    num_proc: int,
    hf_cache: str,
) -> dict[str, datasets.Dataset]:
    """The documents of every split: from ``files`` (split -> existing paths) or, when None, the Hub dataset.
    Without a validation split a ``val_fraction`` of the train documents is held out (``fmt.hold_out``); the
    train split is then cut to its first ``max_train_docs`` documents."""
    raw = _read_raw_splits(files, hub_dataset, fmt, hf_cache)
    docs = {split: _to_documents(ds, fmt, num_proc) for split, ds in raw.items() if split in SPLITS}
    if "validation" not in docs and "train" in docs:
        train = docs["train"]
        train_idx, val_idx = fmt.hold_out(len(train), val_fraction)
        docs["train"], docs["validation"] = train.select(train_idx), train.select(val_idx)
    if max_train_docs is not None and "train" in docs:
        docs["train"] = docs["train"].select(range(min(max_train_docs, len(docs["train"]))))
    for split, ds in docs.items():
        log.info("data: %s has %d documents", split, len(ds))
    return docs
