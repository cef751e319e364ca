"""The generic text data module, `TextDataModule`: TinyStories, Tiny Shakespeare or any text corpus as packed
next-token-prediction blocks (`conf/data/tinystories.yaml`, `conf/data/text_file.yaml`).

Documents are streamed from local files or a Hub dataset (`data/text_formats.py`), a byte-level BPE is
trained on (or reused for) the train split (`data/tokenizer.py`), and every split is tokenized in parallel
straight into a uint16 / uint32 token file, packed into fixed blocks of ``context_length + 1`` tokens and cached
on disk under a key built from the inputs (`data/token_cache.py`), so a second `setup` with the same inputs
neither retrains the tokenizer nor re-tokenizes. Memory stays flat in the corpus size.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from tiny_decoder.core.cache_dir import default_cache_dir
from tiny_decoder.core.checks import check, is_positive_int
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.data import text_formats, token_cache
from tiny_decoder.data import tokenizer as tokenizer_lib
from tiny_decoder.data.text_formats import EOT_TOKEN, SPLITS, Documents, read_documents
from tiny_decoder.data.token_cache import PackedBlocks

log = logging.getLogger(__name__)
TRAIN_BATCH_DOCS = 1000  # documents a batch while training the tokenizer


def _as_path_list(value: str | os.PathLike | list) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


class TextDataModule(L.LightningDataModule):
    """TinyStories (or any text corpus) as packed next-token-prediction blocks; see the module docstring.

    After `setup`: `tokenizer`, `tokenizer_fingerprint`, `vocab_size` (the tokenizer's real size), `eot_id`,
    `context_length`, `bytes_per_token[split]` (UTF-8 bytes of text per token: with a mean loss in nats per
    token, `training.metrics.bits_per_byte` gives bits per byte), `datasets[split]` (PackedBlocks),
    `split_stats[split]`, `cache_hit` (the packed streams were found on disk) and `tokenizer_trained` (this
    instance trained the tokenizer).

    `tokenizer_json` (a `Tokenizer.to_str()`, e.g. the one a checkpoint stores) is used as given: the vocab
    size is taken from it and no train split is needed (evaluating a trained model on new text).
    Splits of `files` set to null are left out; all null means no files (the Hub dataset at `hub_revision`;
    null: the pinned commit of a known dataset). `num_proc`: tokenizing threads (null: the cores).
    """

    def __init__(
        self,
        files: Mapping[str, str | list[str]] | None = None,
        hub_dataset: str | None = "roneneldan/TinyStories",
        hub_revision: str | None = None,
        text_format: str = "stories",
        val_fraction: float = 0.05,
        vocab_size: int = 2048,
        context_length: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        tokenizer_path: str | None = None,
        tokenizer_json: str | None = None,
        max_train_docs: int | None = None,
        max_val_blocks: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer_json"])  # large, and a model's checkpoint stores its own
        self.format = text_formats.text_format(text_format)
        self.given_tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
        if self.given_tokenizer is not None:
            vocab_size = self.given_tokenizer.get_vocab_size()
        tokenizer_lib.check_vocab_size(vocab_size)
        self.files = self._normalize_files(files, need_train=self.given_tokenizer is None)
        if self.files is None and not hub_dataset:
            raise ConfigError("set data.files (split -> path) or data.hub_dataset")
        self.hub_dataset = hub_dataset
        self.hub_revision = None
        if self.files is None and hub_dataset:
            self.hub_revision = text_formats.pinned_revision(hub_dataset, hub_revision)
        self.text_format = text_format
        self.val_fraction = val_fraction
        self.requested_vocab_size = vocab_size
        self.context_length = context_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        check("data.num_proc", num_proc, lambda n: n is None or is_positive_int(n), "null (the cores) or >= 1")
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
            raise ConfigError("no test split: set data.files.test")
        return self._loader("test", shuffle=False)

    # ---------------------------------------------------------------- configuration helpers

    @staticmethod
    def _normalize_files(
        files: Mapping | str | Path | list | None, need_train: bool = True
    ) -> dict[str, list[Path]] | None:
        if files is None:
            return None
        if not isinstance(files, Mapping):  # data.files=stories.txt (or a list of files): the training split
            files = {"train": files}
        normalized = {str(split): _as_path_list(paths) for split, paths in files.items() if paths is not None}
        if not normalized:
            return None
        unknown = sorted(set(normalized) - set(SPLITS))
        if unknown or (need_train and "train" not in normalized):
            raise ConfigError(f"data.files must map a 'train' split (and optionally {SPLITS[1:]}); got {unknown}")
        return normalized

    def _resolved_files(self) -> dict[str, list[Path]] | None:
        if self.files is None:
            return None
        resolved = {}
        for split, paths in self.files.items():
            for path in paths:
                if not path.expanduser().is_file():
                    raise FileNotFoundError(f"data.files.{split}: no such file {path}")
            resolved[split] = [p.expanduser().resolve() for p in paths]
        return resolved

    def _holdout_fraction(self) -> float | None:
        has_validation = self.files is not None and "validation" in self.files
        return None if has_validation else self.val_fraction

    # ---------------------------------------------------------------- tokenizer and cache

    def _load_documents(self) -> dict[str, Documents]:
        return read_documents(
            self._resolved_files(),
            self.hub_dataset,
            self.format,
            val_fraction=self.val_fraction,
            max_train_docs=self.max_train_docs,
            hub_revision=self.hub_revision,
        )

    def _expected_bytes(self) -> dict[str, int]:
        """Each split's text size where files give it (a held-out split: at most its train file's)."""
        files = self._resolved_files() or {}
        sizes = {split: sum(p.stat().st_size for p in paths) for split, paths in files.items()}
        if "train" in sizes and "validation" not in sizes:
            sizes["validation"] = int(sizes["train"] * (self.val_fraction or 0)) + 1
        return sizes

    def _get_tokenizer(self, key_inputs: dict, load_docs: Callable[[], dict]):
        if self.given_tokenizer is not None:
            self.tokenizer_trained = False
            return self.given_tokenizer
        path = self.tokenizer_path or token_cache.tokenizer_cache_path(
            self.cache_root, key_inputs, self.requested_vocab_size
        )
        self.tokenizer_trained = not path.exists()
        return tokenizer_lib.load_or_train_tokenizer(
            path, lambda: load_docs()["train"].batches(TRAIN_BATCH_DOCS), self.requested_vocab_size, EOT_TOKEN
        )

    def _ensure_cache(self):
        """Make sure tokenizer and packed token streams exist on disk; returns (cache dir, tokenizer)."""
        if self.cache_path is not None:
            return self.cache_path, self._cached_tokenizer
        source = token_cache.source_fingerprint(self._resolved_files(), self.hub_dataset, self.hub_revision)
        holdout = self._holdout_fraction()
        key_inputs = token_cache.cache_key_inputs(source, self.text_format, holdout, self.max_train_docs)
        load_docs = functools.cache(self._load_documents)
        tokenizer = self._get_tokenizer(key_inputs, load_docs)
        fingerprint = tokenizer_lib.tokenizer_fingerprint(tokenizer)
        cache_path = token_cache.packed_cache_path(self.cache_root, key_inputs, fingerprint, self.context_length)
        self.cache_hit = token_cache.is_cached(cache_path)
        log.info("data cache %s: %s", "hit" if self.cache_hit else "miss", cache_path)
        if not self.cache_hit:
            token_cache.build_cache(
                cache_path,
                load_docs(),
                tokenizer,
                fingerprint,
                context_length=self.context_length,
                append_eot=self.format.append_eot,
                num_proc=self.num_proc,
                expected_bytes=self._expected_bytes(),
            )
        self.cache_path, self._cached_tokenizer = cache_path, tokenizer
        return cache_path, tokenizer

    def _load_cache(self, cache_path: Path) -> None:
        for split, stats in token_cache.load_split_stats(cache_path).items():
            tokens = token_cache.load_tokens(cache_path, split)
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
