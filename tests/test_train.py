"""End-to-end runs of the training entry point on the sequence task: real configs, real Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_module, tiny_sequence_overrides
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.run.fit import fit_and_test
from tiny_decoder.tasks import load_task


def test_cli_fast_dev_run_of_the_card_recipe():
    result = run_module("tiny_decoder.train", "+experiment=sequence_seed", "debug=fast")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "test/acc_last" in output and "baseline/mad" in output
    assert "samples at step" in output  # continued sequences printed at validation


def test_run_writes_results_and_best_checkpoint(compose_config, tmp_path: Path):
    cfg = compose_config("+experiment=sequence_seed", *tiny_sequence_overrides(epochs=2))
    run = fit_and_test(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["parameters"] == 1094  # the card's model: 2-d input, 3 layers, 2 heads, FFN 32
    assert results["global_step"] == 2 * 640 // 32
    for key in ("val/loss", "val/acc", "val/acc_last", "val/mad", "val/phase1_acc_last", "baseline/mad"):
        assert key in results["val"]
    loss, accuracy = loss_and_accuracy_on_test(run.task, run.trainer.datamodule)
    assert results["test"]["test/acc_last"] == pytest.approx(accuracy)  # the card's model barely learns: ~0
    assert results["test"]["test/loss"] == pytest.approx(loss, rel=1e-5)
    assert results["best_score"] == pytest.approx(run.metric)
    assert Path(results["best_checkpoint"]).is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()


def loss_and_accuracy_on_test(task, datamodule) -> tuple[float, float]:
    """The task's loss (mean over sequences) and the last position's argmax accuracy on the test split,
    computed here from the task's model and loss."""
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            logits = task.eval()(batch["input"])
            loss += float(task.loss(logits, batch["target"])) * len(logits)
            correct += int((logits[:, -1].argmax(-1) == batch["target"][:, -1]).sum())
            total += len(logits)
    return loss / total, correct / total


def test_early_stopping_restores_best_weights(compose_config, tmp_path: Path):
    # A huge constant learning rate: val loss improves first, then gets worse, so training stops early
    # and the last weights are not the best ones.
    cfg = compose_config(
        "+experiment=sequence_strong",
        *tiny_sequence_overrides(epochs=12),
        "model.d_model=32",
        "model.n_layers=1",
        "model.d_ff=64",
        "scheduler=constant",
        "optimizer.lr=0.3",
        "callbacks.early_stopping.patience=2",
        "data.batch_size=32",
    )
    run = fit_and_test(cfg)
    assert run.trainer.current_epoch < 12
    best = torch.load(run.results["best_checkpoint"], weights_only=True)["state_dict"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    current = run.task.state_dict()
    assert any(not torch.equal(best[k], last[k]) for k in best)
    assert all(torch.equal(current[k], best[k]) for k in best)  # the task holds the best weights
    assert run.results["test"]["test/loss"] == pytest.approx(run.results["best_score"], rel=0.5)


def test_invalid_model_config_fails_before_training(compose_config):
    cfg = compose_config("+experiment=sequence_strong", "model.d_model=30", "model.n_heads=4")
    with pytest.raises(ConfigError, match=r"model.d_model \(30\) must be divisible by model.n_heads \(4\)"):
        fit_and_test(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.d_model=30", "model.n_heads=4"], "model.d_model (30) must be divisible by model.n_heads (4)"),
        (["model.dropout=1.5"], "model.dropout must be in [0, 1), got 1.5"),
        (["positional=rope", "model.d_model=12", "model.n_heads=4"], "positional=rope needs an even head size"),
        (["+attention.k=4"], "model.attention.k is not an option of model.attention.name='sdpa'"),
        (["data.seq_len=1"], "seq_len"),
        (["task.weighting=cubic"], "task.loss.weighting='cubic' is unknown"),
    ],
)
def test_bad_config_is_one_clear_line_and_exit_code_2(overrides: list[str], message: str):
    result = run_module("tiny_decoder.train", "+experiment=sequence_strong", "logger=none", *overrides)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_group_option_lists_choices():
    result = run_module("tiny_decoder.train", "+experiment=sequence_strong", "attention=foo")
    assert result.returncode != 0
    assert "attention/foo" in result.stderr and "sdpa" in result.stderr


def test_generate_continues_a_sequence_from_a_checkpoint(compose_config, tmp_path: Path):
    cfg = compose_config("+experiment=sequence_strong", *tiny_sequence_overrides(epochs=1), "test=false")
    run = fit_and_test(cfg)
    ckpt = run.results["best_checkpoint"]
    result = run_module("tiny_decoder.generate", f"ckpt={ckpt}", "sequence=1 2 4 7 11", "steps=5")
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    prompt, continuation = line.split(" -> ")
    assert prompt == "1 2 4 7 11"
    numbers = [int(n) for n in continuation.split()]
    assert len(numbers) == 5 and all(0 <= n <= 255 for n in numbers)
    task = load_task(ckpt)
    assert numbers == task.continue_sequence([1, 2, 4, 7, 11], 5)  # the CLI prints the cached greedy decode


def test_help_lists_config_groups():
    result = run_module("tiny_decoder.train", "--help")
    assert result.returncode == 0
    for group in ("attention:", "positional:", "norm:", "activation:", "experiment:"):
        assert group in result.stdout


def test_a_quick_max_steps_try_of_a_long_recipe_validates_and_keeps_its_checkpoint(tmp_path: Path):
    """``+experiment=sequence_strong trainer.max_steps=N`` stops mid-epoch, before any validation was due: it
    validates at its last step (no EarlyStopping traceback), keeps its checkpoints and exits 0."""
    overrides = ["trainer.max_steps=3", "data.val_samples=96", "data.test_samples=96", "logger=csv"]
    result = run_module("tiny_decoder.train", "+experiment=sequence_strong", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (results_path,) = tmp_path.glob("outputs/sequence/*/*/results.json")
    results = json.loads(results_path.read_text())
    assert results["global_step"] == 3 and "val/loss" in results["val"] and "test/loss" in results["test"]
    checkpoints = {path.name for path in (results_path.parent / "checkpoints").iterdir()}
    assert {"last.ckpt", "step0000003.ckpt"} <= checkpoints and results["best_checkpoint"].endswith("step0000003.ckpt")
