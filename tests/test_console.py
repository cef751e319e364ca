"""A default run's console, as a user sees it at 80 columns: the run line, the model summary, samples, the
progress bar and a compact test table; no Lightning start-up chatter and no library deprecation warnings on
the console, all of it in ``train.log``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, run_module
from tiny_decoder.run.console import CHATTER

COMMAND = ["+experiment=sequence_strong", "trainer.max_steps=3", "data.val_samples=96", "data.test_samples=96"]


def test_a_default_run_shows_what_a_user_needs_and_logs_the_rest(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "80", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("TINY_DECODER_TRACEBACK", None)
    result = subprocess.run(
        [sys.executable, "-m", "tiny_decoder.train", *COMMAND],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    console = (result.stdout + result.stderr).splitlines()
    assert console[0] == "run: " + " ".join(COMMAND)
    assert console[1].startswith("task: SequencePredictor, 496,704 parameters; data: SequenceDataModule, batch 64")
    assert console[2].startswith("outputs: ") and "results.json" in console[2]
    assert not [line for line in console if CHATTER.search(line)]
    assert not [line for line in console if "Warning" in line or "deprecated" in line]
    summary = console[console.index(next(line for line in console if line.lstrip().startswith("Name"))) :][:20]
    assert all(len(line) <= 80 for line in summary) and not any("_metrics" in line for line in summary)
    assert not any("test_family/" in line for line in console)  # per-family test metrics: in the CSV only
    (log,) = tmp_path.glob("outputs/sequence/*/*/train.log")
    logged = log.read_text()
    assert "GPU available" in logged and "results written to" in logged and "run: +experiment" in logged


@pytest.mark.slow
def test_compiled_generation_prints_its_speed_and_no_autotune_report(tmp_path: Path, monkeypatch) -> None:
    checkpoint = REPO_ROOT / "tests" / "fixtures" / "v1_lm.ckpt"
    """The first run of a shape says it compiles (once, and where the program goes); the second loads it quietly
    and prints the same text."""
    args = [f"ckpt={checkpoint}", "prompt=Once upon a time", "max_new_tokens=8", "compile=true"]
    monkeypatch.setenv("TINY_DECODER_CACHE", str(tmp_path / "cache"))
    first, second = (run_module("tiny_decoder.generate", *args, timeout=600, cwd=tmp_path) for _ in "12")
    for result in (first, second):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.startswith("Once upon a time")
        assert "AUTOTUNE" not in result.stderr and "Warning" not in result.stderr
    assert second.stdout == first.stdout
    lines = first.stderr.strip().splitlines()
    assert "compiling the decoding step for this model shape, once" in lines[0] and str(tmp_path / "cache") in lines[0]
    assert "new tokens/s" in lines[-1] and len(lines) == 2
    assert len(second.stderr.strip().splitlines()) == 1 and "new tokens/s" in second.stderr
