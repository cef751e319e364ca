"""Shared fixtures: compose the real Hydra configs of ``conf/`` for in-process tests, and locate the
shared offline data (``../shared/data`` beside the repository)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from tests.helpers import CONF_DIR, SHARED_DATA

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def compiled_step_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled decoding programs (``compile=true``) go to a folder of this session, not the user's cache: each
    session compiles what it uses (the tests of the on-disk cache see their own compilations), and subprocesses
    inherit the folder."""
    folder = tmp_path_factory.mktemp("compiled_step_cache")
    previous = os.environ.get("TINY_DECODER_CACHE")
    os.environ["TINY_DECODER_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("TINY_DECODER_CACHE", None)
    else:
        os.environ["TINY_DECODER_CACHE"] = previous


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """``compose_config("+experiment=sequence_seed", "trainer.max_epochs=1")`` -> a resolved-ready config
    whose outputs go to ``tmp_path``."""

    def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.resume_dir = str(tmp_path)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
