"""What the tests share: the repository's paths, overrides that make a run take seconds, and the two ways to
run a command-line tool (in a subprocess, as a user does, or in this process through its real entry point)."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def tiny_sequence_overrides(epochs: int = 2) -> list[str]:
    """Overrides that make a sequence run take a few seconds."""
    return [
        f"trainer.max_epochs={epochs}",
        "data.train_samples_per_epoch=640",
        "data.val_samples=96",
        "data.test_samples=96",
        "scheduler.warmup_steps=5",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        "~callbacks.rich_model_summary",
        "~callbacks.samples",
        "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false",
    ]


def run_module(module: str, *args: str, timeout: int = 240, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in a subprocess (W&B off, one OpenMP thread, no traceback switches), as a user
    runs it from ``cwd``."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for name in ("HYDRA_FULL_ERROR", "TINY_DECODER_TRACEBACK"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_tool(monkeypatch: pytest.MonkeyPatch, tool: str, *args: str) -> int:
    """``python -m tiny_decoder.<tool> ARGS`` in this process, through its real entry point; the exit code (0
    when it returns). Hydra's global state and job logging are undone afterwards."""
    main = importlib.import_module(f"tiny_decoder.{tool}").main
    monkeypatch.setattr(sys, "argv", [f"tiny_decoder.{tool}", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # recorded, so what the entry point sets is undone after the test
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    monkeypatch.delenv("TINY_DECODER_TRACEBACK", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        for handler in set(root.handlers) - set(handlers):  # Hydra's job logging: back to pytest's
            handler.close()
        root.handlers[:], root.level = handlers, level
    return 0


def run_train(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``python -m tiny_decoder.train ARGS`` in this process (:func:`run_tool`)."""
    return run_tool(monkeypatch, "train", *args)
