"""Where the project keeps what it can rebuild: token caches, tokenizers, compiled decoding programs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "TINY_DECODER_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/tiny_decoder"


def default_cache_dir() -> Path:
    """``$TINY_DECODER_CACHE`` if set, else ``~/.cache/tiny_decoder``."""
    return Path(os.environ.get(CACHE_ENV_VAR, DEFAULT_CACHE_DIR)).expanduser()
