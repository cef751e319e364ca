"""Byte-level BPE tokenizer: training with the `tokenizers` library, load-or-train with a vocab-size check,
and a short fingerprint that identifies a trained tokenizer (recorded in checkpoints)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tiny_decoder.core.checks import check_int

log = logging.getLogger(__name__)

DEFAULT_EOT = "<|endoftext|>"
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + 1  # every byte plus the end-of-text token
FINGERPRINT_CHARS = 16


def check_vocab_size(vocab_size: int) -> None:
    """Refuse vocab sizes that cannot hold the 256 byte symbols plus the end-of-text token."""
    check_int(
        "data.vocab_size", vocab_size, MIN_VOCAB_SIZE, hint=" (a byte-level BPE: 256 bytes + the end-of-text token)"
    )


def train_bpe(texts: Iterable[str] | Iterable[list[str]], vocab_size: int, eot_token: str = DEFAULT_EOT) -> Tokenizer:
    """Train a byte-level BPE on `texts` (strings or batches of strings); the EOT token gets id 0."""
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eot_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def eot_id(tokenizer: Tokenizer, eot_token: str = DEFAULT_EOT) -> int:
    """The id of the end-of-text token; raises if the tokenizer does not know it."""
    token_id = tokenizer.token_to_id(eot_token)
    if token_id is None:
        raise ValueError(f"tokenizer has no end-of-text token {eot_token!r}")
    return token_id


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short sha256 of the tokenizer's serialized form: equal fingerprints mean identical tokenizers."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Write tokenizer.json atomically (a temp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)


def _load_checked(path: Path, vocab_size: int, eot_token: str) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    found = tokenizer.get_vocab_size()
    if found != vocab_size:
        raise ValueError(
            f"tokenizer file {path} has {found} tokens but data.vocab_size={vocab_size}: "
            "set data.vocab_size to match, or point data.tokenizer_path elsewhere / delete the file to retrain"
        )
    eot_id(tokenizer, eot_token)
    return tokenizer


def _train_checked(texts_fn: Callable[[], Iterable], vocab_size: int, eot_token: str) -> Tokenizer:
    tokenizer = train_bpe(texts_fn(), vocab_size, eot_token)
    found = tokenizer.get_vocab_size()
    if found != vocab_size:
        raise ValueError(
            f"the training text only supports {found} BPE tokens, fewer than data.vocab_size={vocab_size}: "
            "lower data.vocab_size or use more text"
        )
    return tokenizer


def load_or_train_tokenizer(
    path: Path, texts_fn: Callable[[], Iterable], vocab_size: int, eot_token: str = DEFAULT_EOT
) -> Tokenizer:
    """Reuse tokenizer.json at `path` when present (its vocab size must equal `vocab_size`);
    otherwise train on `texts_fn()` (only called when training is needed) and save to `path`."""
    path = Path(path)
    check_vocab_size(vocab_size)
    if path.exists():
        log.info("reusing tokenizer %s", path)
        return _load_checked(path, vocab_size, eot_token)
    log.info("training byte-level BPE tokenizer (vocab %d) -> %s", vocab_size, path)
    started = time.perf_counter()
    tokenizer = _train_checked(texts_fn, vocab_size, eot_token)
    save_tokenizer(tokenizer, path)
    log.info("tokenizer trained: %d tokens in %.1f s", tokenizer.get_vocab_size(), time.perf_counter() - started)
    return tokenizer
