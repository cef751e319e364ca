"""Resume: a run killed mid-epoch (SIGKILL, no chance to save) or stopped by SIGTERM (saves ``last.ckpt`` at
once) and continued with ``resume=auto`` ends exactly like the uninterrupted run with the same seed: same
validation and test metrics, same best checkpoint, same final weights (dropout on, so the RNG matters too)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.helpers import run_module

KILL_ENV = "TINY_DECODER_TEST_KILL"  # "STEP:SIGNAL": send SIGNAL to the run itself after optimizer step STEP


class KillAt(L.Callback):
    """Test helper: after global step N, send a signal to this process (configured by ``$TINY_DECODER_TEST_KILL``,
    so the command line, and so ``resume=auto``'s notion of "the same command", is the same for every run)."""

    def __init__(self) -> None:
        step, signum = (os.environ.get(KILL_ENV) or "-1:0").split(":")
        self.step, self.signum = int(step), int(signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


# 20 steps an epoch, 3 epochs, validation at each epoch end, last.ckpt also every 7 steps (mid-epoch)
RUN = [
    "+experiment=sequence_strong",
    "trainer.max_epochs=3",
    "data.train_samples_per_epoch=640",
    "data.batch_size=32",
    "data.val_samples=96",
    "data.test_samples=96",
    "scheduler.warmup_steps=5",
    "model.d_model=32",
    "model.n_layers=1",
    "model.d_ff=64",
    "model.dropout=0.1",
    "callbacks.periodic_checkpoint.every_n_train_steps=7",
    "logger=csv",
    "~callbacks.rich_progress_bar",
    "~callbacks.rich_model_summary",
    "~callbacks.samples",
    "~callbacks.attention_maps",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "+callbacks.kill._target_=tests.test_resume.KillAt",
]


def train(root: Path, run: str, *extra: str, kill: str | None = None):
    os.environ.pop(KILL_ENV, None)
    if kill:
        os.environ[KILL_ENV] = kill
    try:
        return run_module("tiny_decoder.train", *RUN, f"paths.resume_dir={root}", f"hydra.run.dir={root / run}", *extra)
    finally:
        os.environ.pop(KILL_ENV, None)


def results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(reference: dict[str, Any], resumed: dict[str, Any]) -> None:
    assert resumed["global_step"] == reference["global_step"] == 60
    assert resumed["val"] == pytest.approx(reference["val"], rel=1e-6, abs=1e-7)
    assert resumed["test"] == pytest.approx(reference["test"], rel=1e-6, abs=1e-7)
    assert resumed["best_score"] == pytest.approx(reference["best_score"], rel=1e-6)
    assert Path(resumed["best_checkpoint"]).name == Path(reference["best_checkpoint"]).name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = train(root, "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_matches_uninterrupted_run(reference: Path, tmp_path: Path):
    killed = train(tmp_path, "run1", kill=f"30:{int(signal.SIGKILL)}")
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 28  # the periodic save before the kill
    assert not (tmp_path / "run1" / "results.json").exists()

    resumed = train(tmp_path, "run2", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning's mid-epoch warning: the loader resumes exactly
    run2 = results(tmp_path / "run2")
    assert run2["resumed_from"] == str(last)
    assert_same_run(results(reference), run2)
    final, expected = weights(last), weights(reference / "checkpoints" / "last.ckpt")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert (tmp_path / "run1" / "csv" / "metrics.csv").is_file()  # the killed run's logs are kept


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_at_once_and_resumes_exactly(reference: Path, tmp_path: Path):
    stopped = train(tmp_path, "run1", kill=f"25:{int(signal.SIGTERM)}")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "error: interrupted by SIGTERM at step 25" in stopped.stderr and "resume=auto" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    last = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 25  # saved on the signal, not at step 21
    assert "TrainingInterrupted" in (tmp_path / "run1" / "error.txt").read_text()

    resumed = train(tmp_path, "run2", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(results(reference), results(tmp_path / "run2"))


@pytest.mark.slow
def test_ctrl_c_stops_after_the_batch_and_saves_last_checkpoint(tmp_path: Path):
    stopped = train(tmp_path, "run1", kill=f"25:{int(signal.SIGINT)}")
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert "error: interrupted by SIGINT at step 25" in stopped.stderr and "Traceback" not in stopped.stderr
    assert torch.load(tmp_path / "run1" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 25
