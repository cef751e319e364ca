"""Tests for ``tiny_decoder.evaluate``: the table / JSON output, the sequence task's ``evaluate_outputs``, and an
end-to-end command-line run of the language model (train -> generate -> evaluate) in subprocesses."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tiny_decoder.evaluate import evaluate_checkpoint, format_table
from tiny_decoder.model import ModelConfig
from tiny_decoder.tasks.sequence_predictor import SequencePredictor

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
TRAIN_FILE = DATA_DIR / "tinystories" / "tinystories_v2_train_head.txt"
VALID_FILE = DATA_DIR / "tinystories" / "tinystories_valid_head.txt"
LAMBADA_FILE = DATA_DIR / "lambada" / "lambada_test.jsonl"
PROMPT = "Once upon a time"


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"missing shared data file {path}")
    return path


def sequence_checkpoint(path: Path) -> Path:
    """A small untrained sequence predictor saved the way load_task reads checkpoints."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, context_length=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    task = SequencePredictor(config.to_dict())
    checkpoint = {
        "tiny_decoder": {"task": task.task_name, "model": config.to_dict()},
        "hyper_parameters": dict(task.hparams),
        "state_dict": task.state_dict(),
    }
    torch.save(checkpoint, path)
    return path


def sequence_config(ckpt: Path, **overrides) -> OmegaConf:
    values = {"ckpt": str(ckpt), "device": "cpu", "seed": 0, "n": 90, "batch_size": 32, "output": None}
    return OmegaConf.create({**values, **overrides})


def test_format_table_aligns_names_and_values():
    lines = format_table({"val/loss": 2.5, "lambada/passages": 20.0, "lambada/word_ppl": 3.2e9}).splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert lines[2].split() == ["val/loss", "2.5000"]
    assert lines[3].split() == ["lambada/passages", "20"]
    assert lines[4].split() == ["lambada/word_ppl", "3.2000e+09"]
    assert len({len(line) for line in lines}) == 1


def test_sequence_evaluation_prints_a_table_and_writes_json(tmp_path, capsys):
    ckpt = sequence_checkpoint(tmp_path / "seq.ckpt")
    output = tmp_path / "out" / "metrics.json"
    results = evaluate_checkpoint(sequence_config(ckpt, output=str(output)))
    for name in ("test/loss", "test/acc", "test/acc_last", "test/mad", "test/phase1_acc_last", "test/phase3_acc_last"):
        assert math.isfinite(results[name])
    assert 0.0 <= results["test/acc"] <= 1.0
    assert not any(name.startswith(("baseline/", "test_family/")) for name in results)
    payload = json.loads(output.read_text())
    assert payload["task"] == "sequence" and payload["metrics"] == pytest.approx(results)
    printed = capsys.readouterr().out
    assert "test/acc_last" in printed and str(output) in printed


def test_sequence_evaluation_draws_fresh_sequences_from_the_seed(tmp_path):
    ckpt = sequence_checkpoint(tmp_path / "seq.ckpt")
    first = evaluate_checkpoint(sequence_config(ckpt, seed=3))
    assert evaluate_checkpoint(sequence_config(ckpt, seed=3)) == first
    assert evaluate_checkpoint(sequence_config(ckpt, seed=4)) != first


# ----------------------------------------------------------------------------- command line, end to end


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m ARGS`` in ``cwd`` (a temporary directory: the CLIs may write logs where they run)."""
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def table_values(stdout: str) -> dict[str, float]:
    """``name value`` rows of the printed table."""
    rows = (line.split() for line in stdout.splitlines())
    return {row[0]: float(row[1]) for row in rows if len(row) == 2 and "/" in row[0]}


@pytest.mark.slow  # processes / compilation: tens of seconds (CI runs -m slow too)
def test_train_generate_evaluate_from_the_command_line(tmp_path):
    train_file, valid_file, lambada = require(TRAIN_FILE), require(VALID_FILE), require(LAMBADA_FILE)
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TINY_DECODER_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run_dir = tmp_path / "run"
    run(
        [
            "tiny_decoder.train",
            "+experiment=stories_tiny",
            f"data.files.train={train_file}",
            f"data.files.validation={valid_file}",
            "data.max_train_docs=150",
            "data.vocab_size=300",
            "data.context_length=32",
            "data.batch_size=16",
            "data.max_val_blocks=16",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.d_ff=64",
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "scheduler.warmup_steps=5",
            "task.sample_max_new_tokens=10",
            "logger=csv",
            "~callbacks.rich_progress_bar",
            "~callbacks.rich_model_summary",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            f"hydra.run.dir={run_dir}",
        ],
        env,
        tmp_path,
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 20
    assert math.isfinite(results["val"]["val/loss"]) and math.isfinite(results["val"]["val/bpb"])
    ckpt = Path(results["best_checkpoint"])
    assert ckpt.is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()

    generated = run(
        ["tiny_decoder.generate", f"ckpt={ckpt}", f"prompt={PROMPT}", "max_new_tokens=20", "num_samples=2"],
        env,
        tmp_path,
    )
    assert generated.stdout.startswith(PROMPT)
    assert generated.stdout.count(PROMPT) >= 2

    output = tmp_path / "eval.json"
    evaluated = run(
        [
            "tiny_decoder.evaluate",
            f"ckpt={ckpt}",
            f"data.files.validation={valid_file}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "max_blocks=32",
            f"lambada={lambada}",
            "lambada_limit=20",
            f"output={output}",
        ],
        env,
        tmp_path,
    )
    metrics = json.loads(output.read_text())["metrics"]
    for name in ("val/loss", "val/ppl", "val/bpb", "lambada/acc", "lambada/loss", "lambada/word_ppl"):
        assert math.isfinite(metrics[name]), name
    assert metrics["lambada/passages"] == 20 and 0.0 <= metrics["lambada/acc"] <= 1.0
    assert metrics["val/bpb"] < 8.0  # better than 8 bits a byte: the model learned something about bytes
    printed = table_values(evaluated.stdout)
    assert printed["val/loss"] == pytest.approx(metrics["val/loss"], abs=1e-4)
    assert printed["lambada/passages"] == 20
    # progress on stderr (a bar on a terminal), then a closing count: a long evaluation never looks hung
    assert re.search(r"^val: 32 blocks in \d+\.\d s$", evaluated.stderr, re.M), evaluated.stderr[-2000:]
    assert re.search(r"^LAMBADA: 20 passages in \d+\.\d s$", evaluated.stderr, re.M), evaluated.stderr[-2000:]
