"""Resume: a run killed mid-epoch (SIGKILL, no chance to save) or stopped by SIGTERM (saves ``last.ckpt`` at
once) and continued with ``resume=auto`` ends exactly like the uninterrupted run with the same seed: same
validation and test metrics, same best checkpoint, same final weights (dropout on, so the RNG matters too).
The resumed epoch skips the batches already trained on without loading them, and a resumed run logs into the
same W&B run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from tests.helpers import run_module
from tiny_decoder.run.resume import continue_wandb_run
from tiny_decoder.tasks.checkpoint import METADATA_KEY
from tiny_decoder.training.callbacks import WANDB_RUN_ID_KEY, WandbRunId, resumable_loader

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


class CountingDataset(Dataset):
    """Items 0..n-1 that count how many were loaded."""

    def __init__(self, n: int):
        self.n, self.loaded = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        self.loaded += 1
        return index


@pytest.mark.parametrize("workers", [0, 1])
def test_resumed_epoch_skips_batches_without_loading_them(workers: int):
    def loader(data: CountingDataset):
        plain = DataLoader(data, batch_size=4, shuffle=True, drop_last=True, num_workers=workers)
        return resumable_loader(plain, seed=3, epoch_fn=lambda: 2)

    uninterrupted = [batch.tolist() for batch in loader(CountingDataset(400))]
    data = CountingDataset(400)
    resumed = loader(data)
    resumed.load_state_dict({"epoch": 2, "batches": 90})  # killed after 90 of the epoch's 100 batches
    rest = [batch.tolist() for batch in resumed]
    assert rest == uninterrupted[90:]  # the exact order of the uninterrupted epoch
    if not workers:  # (a worker process counts in its own copy of the dataset)
        assert data.loaded == 10 * 4  # only the batches trained on now were loaded
    assert resumed.state_dict() == {"epoch": 2, "batches": 100}


BARE_CHECKPOINT = {"state_dict": {}, "hyper_parameters": {}, METADATA_KEY: {"task": "language_model"}}


def test_checkpoint_keeps_the_wandb_run_id_and_resume_continues_it(tmp_path: Path):
    checkpoint: dict[str, Any] = {}
    logger = WandbLogger(id="run42", offline=True, save_dir=str(tmp_path))  # not started: version is the id
    WandbRunId().on_save_checkpoint(SimpleNamespace(loggers=[logger]), L.LightningModule(), checkpoint)
    assert checkpoint[WANDB_RUN_ID_KEY] == "run42"

    cfg = OmegaConf.create({"logger": {"csv": {"_target_": "x.CSVLogger"}, "wandb": {
        "_target_": "lightning.pytorch.loggers.WandbLogger", "id": None, "resume": "allow"}}})  # fmt: skip
    saved = tmp_path / "last.ckpt"
    torch.save({**checkpoint, **BARE_CHECKPOINT}, saved)
    assert continue_wandb_run(cfg, str(saved)) == "run42"
    assert (cfg.logger.wandb.id, cfg.logger.wandb.resume) == ("run42", "allow")
    torch.save(BARE_CHECKPOINT, saved)  # a checkpoint of a run without W&B: a new W&B run
    fresh = OmegaConf.create({"logger": {"wandb": dict(cfg.logger.wandb, id=None)}})
    assert continue_wandb_run(fresh, str(saved)) is None and fresh.logger.wandb.id is None


@pytest.mark.slow
def test_resumed_run_logs_into_the_same_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb = ["logger=many", "logger.wandb.offline=true"]
    killed = train(tmp_path, "run1", *wandb, kill=f"30:{int(signal.SIGKILL)}")
    assert killed.returncode == -signal.SIGKILL
    resumed = train(tmp_path, "run2", *wandb, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (first,) = (tmp_path / "run1" / "wandb").glob("offline-run-*")
    (second,) = (tmp_path / "run2" / "wandb").glob("offline-run-*")
    assert first.name.rsplit("-", 1)[1] == second.name.rsplit("-", 1)[1]  # the same run id
