"""LightningDataModule for TinyStories and any text corpus.

Documents are read with `datasets` (local files or a Hub dataset), a byte-level BPE is trained on (or
reused for) the train split, every split is tokenized with `Dataset.map` and packed into fixed blocks of
`context_length + 1` tokens. Token streams are cached on disk under a key built from the inputs, so a second
`setup` with the same inputs neither retrains the tokenizer nor re-tokenizes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from tiny_decoder.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

EOT_TOKEN = tokenizer_lib.DEFAULT_EOT
SPLITS = ("train", "validation", "test")
CACHE_VERSION = 1
CACHE_ENV_VAR = "TINY_DECODER_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/tiny_decoder"
META_FILE = "meta.json"
KEY_CHARS = 16
MAP_BATCH_SIZE = 1000
PLAIN_CHUNK_CHARS = 4096
HOLDOUT_SEED = 1234  # fixed, so the held-out validation docs do not change with the training seed


# ----------------------------------------------------------------------------- pure helpers


def bits_per_byte(loss_nats: float | torch.Tensor, n_tokens: float, n_bytes: float) -> float | torch.Tensor:
    """Convert a mean cross-entropy in nats per token into bits per UTF-8 byte of text."""
    return loss_nats * (n_tokens / n_bytes) / math.log(2)


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:KEY_CHARS]


def default_cache_dir() -> Path:
    """`$TINY_DECODER_CACHE` if set, else ~/.cache/tiny_decoder."""
    return Path(os.environ.get(CACHE_ENV_VAR, DEFAULT_CACHE_DIR)).expanduser()


def _as_path_list(value: str | os.PathLike | list) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def _file_signature(path: Path) -> list:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _effective_num_proc(num_proc: int, n_rows: int) -> int | None:
    n = min(num_proc, n_rows)
    return n if n > 1 else None


# ----------------------------------------------------------------------------- text formats


def _split_stories(batch: dict) -> dict:
    """Batched map: split raw rows on the EOT marker, strip, drop empty stories."""
    stories = (s.strip() for doc in batch["text"] for s in doc.split(EOT_TOKEN))
    return {"text": [s for s in stories if s]}


def chunk_lines(text: str, max_chars: int = PLAIN_CHUNK_CHARS) -> list[str]:
    """Cut text at line ends into chunks of at most ~max_chars; "".join(chunks) == text."""
    chunks, current, size = [], [], 0
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
    reader = STORY_READERS.get(path.suffix)
    if reader is None:
        raise ValueError(f"unsupported story file {path}: expected one of {sorted(STORY_READERS)}")
    return reader(path, cache_dir)


def _n_holdout(n_docs: int, fraction: float) -> int:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction={fraction} must be in (0, 1) when no validation file is given")
    n_val = max(1, round(n_docs * fraction))
    if n_val >= n_docs:
        raise ValueError(f"cannot hold out data.val_fraction={fraction} of only {n_docs} train documents")
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


# ----------------------------------------------------------------------------- tokenizing and packing


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


def _iter_text_batches(ds: datasets.Dataset) -> Iterator[list[str]]:
    for batch in ds.iter(batch_size=MAP_BATCH_SIZE):
        yield batch["text"]


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


# ----------------------------------------------------------------------------- the datamodule


class TextDataModule(L.LightningDataModule):
    """TinyStories (or any text corpus) as packed next-token-prediction blocks; see the module docstring.

    After `setup`: `tokenizer`, `tokenizer_fingerprint`, `vocab_size` (the tokenizer's real size), `eot_id`,
    `context_length`, `bytes_per_token[split]`, `datasets[split]` (PackedBlocks), `cache_hit` (the packed
    streams were found on disk) and `tokenizer_trained` (this instance trained the tokenizer).

    `tokenizer_json` (a `Tokenizer.to_str()`, e.g. the one a checkpoint stores) is used as given: the vocab
    size is taken from it and no train split is needed (evaluating a trained model on new text).
    Splits of `files` set to null are left out; all null means no files (the Hub dataset).
    """

    def __init__(
        self,
        files: Mapping[str, str | list[str]] | None = None,
        hub_dataset: str | None = "roneneldan/TinyStories",
        text_format: str = "stories",
        val_fraction: float = 0.05,
        vocab_size: int = 2048,
        context_length: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        num_proc: int = 1,
        cache_dir: str | None = None,
        tokenizer_path: str | None = None,
        tokenizer_json: str | None = None,
        max_train_docs: int | None = None,
        max_val_blocks: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer_json"])  # large, and a model's checkpoint stores its own
        if text_format not in TEXT_FORMATS:
            raise ValueError(f"data.text_format={text_format!r} is not one of {sorted(TEXT_FORMATS)}")
        self.given_tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
        if self.given_tokenizer is not None:
            vocab_size = self.given_tokenizer.get_vocab_size()
        tokenizer_lib.check_vocab_size(vocab_size)
        self.files = self._normalize_files(files, need_train=self.given_tokenizer is None)
        if self.files is None and not hub_dataset:
            raise ValueError("set data.files (split -> path) or data.hub_dataset")
        self.hub_dataset = hub_dataset
        self.text_format = text_format
        self.format = TEXT_FORMATS[text_format]
        self.val_fraction = val_fraction
        self.requested_vocab_size = vocab_size
        self.context_length = context_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.tokenizer_path = Path(tokenizer_path).expanduser() if tokenizer_path else None
        self.max_train_docs = max_train_docs
        self.max_val_blocks = max_val_blocks
        self.seed = seed

        self.tokenizer = None
        self.tokenizer_fingerprint: str | None = None
        self.datasets: dict[str, PackedBlocks] = {}
        self.bytes_per_token: dict[str, float] = {}
        self.split_stats: dict[str, dict] = {}
        self.cache_path: Path | None = None
        self.cache_hit: bool | None = None
        self.tokenizer_trained: bool | None = None
        self._cached_tokenizer = None

    # ---------------------------------------------------------------- public properties

    @property
    def vocab_size(self) -> int:
        """The tokenizer's actual vocabulary size (the requested one before setup)."""
        return self.tokenizer.get_vocab_size() if self.tokenizer is not None else self.requested_vocab_size

    @property
    def eot_id(self) -> int:
        return tokenizer_lib.eot_id(self._require_tokenizer(), EOT_TOKEN)

    def bits_per_byte(self, loss_nats: float | torch.Tensor, split: str = "validation") -> float | torch.Tensor:
        """Mean loss (nats/token) on `split` -> bits per UTF-8 byte of that split's text."""
        if split not in self.bytes_per_token:
            raise KeyError(f"no bytes_per_token for split {split!r}: call setup() first")
        return bits_per_byte(loss_nats, n_tokens=1.0, n_bytes=self.bytes_per_token[split])

    # ---------------------------------------------------------------- lightning hooks

    def prepare_data(self) -> None:
        self._ensure_cache()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        cache_path, tokenizer = self._ensure_cache()
        self.tokenizer = tokenizer
        self.tokenizer_fingerprint = tokenizer_lib.tokenizer_fingerprint(tokenizer)
        self._load_cache(cache_path)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise ValueError("no test split: set data.files.test")
        return self._loader("test", shuffle=False)

    # ---------------------------------------------------------------- configuration helpers

    @staticmethod
    def _normalize_files(files: Mapping | None, need_train: bool = True) -> dict[str, list[Path]] | None:
        if files is None:
            return None
        normalized = {str(split): _as_path_list(paths) for split, paths in files.items() if paths is not None}
        if not normalized:
            return None
        unknown = sorted(set(normalized) - set(SPLITS))
        if unknown or (need_train and "train" not in normalized):
            raise ValueError(f"data.files must map a 'train' split (and optionally {SPLITS[1:]}); got {unknown}")
        return normalized

    def _resolved_files(self) -> dict[str, list[Path]]:
        resolved = {}
        for split, paths in self.files.items():
            for path in paths:
                if not path.expanduser().is_file():
                    raise FileNotFoundError(f"data.files.{split}: no such file {path}")
            resolved[split] = [p.expanduser().resolve() for p in paths]
        return resolved

    def _source_fingerprint(self) -> dict:
        if self.files is None:
            return {"hub": self.hub_dataset}
        return {split: [_file_signature(p) for p in paths] for split, paths in self._resolved_files().items()}

    def _holdout_fraction(self) -> float | None:
        has_validation = self.files is not None and "validation" in self.files
        return None if has_validation else self.val_fraction

    def _key_inputs(self, source: dict) -> dict:
        return {
            "version": CACHE_VERSION,
            "source": source,
            "format": self.text_format,
            "holdout": self._holdout_fraction(),
            "max_train_docs": self.max_train_docs,
            "eot": EOT_TOKEN,
        }

    # ---------------------------------------------------------------- loading documents

    def _read_raw_splits(self) -> dict[str, datasets.Dataset]:
        if self.files is None:
            return dict(datasets.load_dataset(self.hub_dataset))
        hf_cache = str(self.cache_root / "hf_datasets")
        return {
            split: datasets.concatenate_datasets([self.format.read_file(p, hf_cache) for p in paths])
            for split, paths in self._resolved_files().items()
        }

    def _to_documents(self, raw: datasets.Dataset) -> datasets.Dataset:
        return raw.map(
            self.format.to_documents,
            batched=True,
            remove_columns=raw.column_names,
            num_proc=_effective_num_proc(self.num_proc, len(raw)),
            desc="documents",
        )

    def _hold_out_validation(self, docs: dict[str, datasets.Dataset]) -> None:
        train = docs["train"]
        train_idx, val_idx = self.format.hold_out(len(train), self.val_fraction)
        docs["train"], docs["validation"] = train.select(train_idx), train.select(val_idx)

    def _load_documents(self) -> dict[str, datasets.Dataset]:
        raw = self._read_raw_splits()
        docs = {split: self._to_documents(ds) for split, ds in raw.items() if split in SPLITS}
        if "validation" not in docs and "train" in docs:
            self._hold_out_validation(docs)
        if self.max_train_docs is not None and "train" in docs:
            docs["train"] = docs["train"].select(range(min(self.max_train_docs, len(docs["train"]))))
        for split, ds in docs.items():
            log.info("data: %s has %d documents", split, len(ds))
        return docs

    # ---------------------------------------------------------------- tokenizer and cache

    def _default_tokenizer_path(self, key_inputs: dict) -> Path:
        key = _digest({**key_inputs, "vocab_size": self.requested_vocab_size})
        return self.cache_root / "tokenizers" / key / "tokenizer.json"

    def _get_tokenizer(self, key_inputs: dict, load_docs: Callable[[], dict]):
        if self.given_tokenizer is not None:
            self.tokenizer_trained = False
            return self.given_tokenizer
        path = self.tokenizer_path or self._default_tokenizer_path(key_inputs)
        self.tokenizer_trained = not path.exists()
        return tokenizer_lib.load_or_train_tokenizer(
            path, lambda: _iter_text_batches(load_docs()["train"]), self.requested_vocab_size, EOT_TOKEN
        )

    def _ensure_cache(self):
        """Make sure tokenizer and packed token streams exist on disk; returns (cache dir, tokenizer)."""
        if self.cache_path is not None:
            return self.cache_path, self._cached_tokenizer
        key_inputs = self._key_inputs(self._source_fingerprint())
        load_docs = functools.cache(self._load_documents)
        tokenizer = self._get_tokenizer(key_inputs, load_docs)
        fingerprint = tokenizer_lib.tokenizer_fingerprint(tokenizer)
        key = _digest({**key_inputs, "tokenizer": fingerprint, "context_length": self.context_length})
        cache_path = self.cache_root / "packed" / key
        self.cache_hit = (cache_path / META_FILE).exists()
        log.info("data cache %s: %s", "hit" if self.cache_hit else "miss", cache_path)
        if not self.cache_hit:
            self._build_cache(cache_path, tokenizer, fingerprint, load_docs())
        self.cache_path, self._cached_tokenizer = cache_path, tokenizer
        return cache_path, tokenizer

    def _encode_split(self, docs: datasets.Dataset, tokenizer) -> tuple[np.ndarray, int]:
        if self.num_proc > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        suffix = [tokenizer_lib.eot_id(tokenizer, EOT_TOKEN)] if self.format.append_eot else []
        encoded = docs.map(
            _encode_batch,
            batched=True,
            batch_size=MAP_BATCH_SIZE,
            fn_kwargs={"tokenizer": tokenizer, "suffix": suffix},
            remove_columns=docs.column_names,
            num_proc=_effective_num_proc(self.num_proc, len(docs)),
            desc="tokenizing",
        )
        return _stream_and_bytes(encoded, _token_dtype(tokenizer.get_vocab_size()))

    def _check_enough_tokens(self, split: str, n_tokens: int) -> None:
        needed = self.context_length + 1
        if n_tokens < needed:
            raise ValueError(
                f"split {split!r} has only {n_tokens} tokens, but one block needs data.context_length + 1 = "
                f"{needed}: use more text or a smaller data.context_length"
            )

    def _build_cache(self, cache_path: Path, tokenizer, fingerprint: str, docs: dict) -> None:
        tmp = cache_path.with_name(f"{cache_path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        splits = {}
        for split, split_docs in docs.items():
            stream, n_bytes = self._encode_split(split_docs, tokenizer)
            self._check_enough_tokens(split, len(stream))
            np.save(tmp / f"{split}.npy", stream)
            splits[split] = {"docs": len(split_docs), "tokens": int(len(stream)), "bytes": int(n_bytes)}
        meta = {"tokenizer_fingerprint": fingerprint, "context_length": self.context_length, "splits": splits}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, cache_path)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)

    def _load_cache(self, cache_path: Path) -> None:
        meta = json.loads((cache_path / META_FILE).read_text())
        for split, stats in meta["splits"].items():
            tokens = np.load(cache_path / f"{split}.npy", mmap_mode="r")
            max_blocks = self.max_val_blocks if split == "validation" else None
            self.datasets[split] = PackedBlocks(tokens, self.context_length, max_blocks)
            self.bytes_per_token[split] = stats["bytes"] / stats["tokens"]
            self.split_stats[split] = {**stats, "blocks": len(self.datasets[split])}
            log.info(
                "data: %s: %d docs, %d tokens, %d blocks of %d, %.3f bytes/token",
                split, stats["docs"], stats["tokens"], len(self.datasets[split]),
                self.context_length + 1, self.bytes_per_token[split],
            )  # fmt: skip

    # ---------------------------------------------------------------- loaders

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError("the tokenizer is available after setup()")
        return self.tokenizer

    def _shuffle_seed(self) -> int:
        """seed + current epoch: a new order each epoch even when loaders are rebuilt every epoch."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self.seed + epoch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split!r} data: call setup() first")
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self._shuffle_seed()) if shuffle else None,
            drop_last=shuffle and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
