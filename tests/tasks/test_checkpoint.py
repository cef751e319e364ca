"""``tasks.checkpoint``: checkpoints of the previous layout still load and compute what they computed, a new
checkpoint stores the model config once, and every unusable file is one ``CheckpointError`` naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, run_module
from tiny_decoder.core.errors import CheckpointError
from tiny_decoder.tasks import load_task
from tiny_decoder.tasks.checkpoint import FORMAT, METADATA_KEY, check_checkpoint, metadata, read_checkpoint
from tiny_decoder.tasks.sequence_predictor import SequencePredictor

FIXTURES = REPO_ROOT / "tests" / "fixtures"
# (task class, logits of ids 0..7 summed, argmax and max of the last position), computed with the layout that
# wrote the fixtures (tests/fixtures/make_checkpoints.py), before the restructuring
V1 = {
    "sequence": ("SequencePredictor", 0.219846, 76, 0.098752),
    "lm": ("LanguageModel", -1.56892, 131, 0.26017),
}


@pytest.mark.parametrize("name", sorted(V1))
def test_a_format_1_checkpoint_loads_and_computes_the_same_logits(name: str) -> None:
    path = FIXTURES / f"v1_{name}.ckpt"
    assert "model" in torch.load(path, weights_only=True)[METADATA_KEY]  # really the old format
    task = load_task(path)
    class_name, total, argmax, top = V1[name]
    logits = task(torch.arange(8).unsqueeze(0))
    assert type(task).__name__ == class_name and logits.shape[:2] == (1, 8)
    assert logits.double().sum().item() == pytest.approx(total, abs=1e-5)
    assert logits[0, -1].argmax().item() == argmax
    assert logits[0, -1].max().item() == pytest.approx(top, abs=1e-6)


def test_format_1_resume_check_reads_the_model_config(tmp_path: Path) -> None:
    path = FIXTURES / "v1_sequence.ckpt"
    stored = load_task(path).model.config.to_dict()
    check_checkpoint(path, stored, "sequence")
    with pytest.raises(CheckpointError, match=r"resume=.*model.d_model: 2 in the checkpoint, 4 here"):
        check_checkpoint(path, {**stored, "d_model": 4}, "sequence")
    with pytest.raises(CheckpointError, match="a checkpoint of task 'sequence', this run trains 'lm'"):
        check_checkpoint(path, None, "lm")


def test_a_new_checkpoint_stores_the_model_config_once(tmp_path: Path) -> None:
    task = SequencePredictor(model={"vocab_size": 16, "context_length": 4, "d_model": 8, "n_heads": 2, "d_ff": 16})
    checkpoint: dict = {"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    assert checkpoint[METADATA_KEY] == metadata("sequence") == {"format": FORMAT, "task": "sequence"}
    torch.save(checkpoint, tmp_path / "new.ckpt")
    loaded = load_task(tmp_path / "new.ckpt")
    assert loaded.model.config == task.model.config and loaded.task_name == "sequence"
    torch.testing.assert_close(loaded(torch.zeros(1, 4, dtype=torch.long)), task.eval()(torch.zeros(1, 4).long()))


def damaged_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    whole = (FIXTURES / "v1_sequence.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    return {
        "missing": (tmp_path / "missing.ckpt", "no such checkpoint file"),
        "truncated": (tmp_path / "truncated.ckpt", "cannot read this checkpoint"),
        "text": (tmp_path / "text.ckpt", "cannot read this checkpoint"),
        "foreign": (tmp_path / "foreign.ckpt", "not a tiny_decoder training checkpoint"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "foreign"])
def test_an_unusable_file_is_one_checkpoint_error_naming_the_field(tmp_path: Path, case: str) -> None:
    path, message = damaged_files(tmp_path)[case]
    with pytest.raises(CheckpointError, match=f"^ckpt={path}: {message}"):
        load_task(path)
    with pytest.raises(CheckpointError, match=f"^distillation.teacher_ckpt={path}: {message}"):
        read_checkpoint(path, field="distillation.teacher_ckpt")


@pytest.mark.parametrize("tool", ["generate", "evaluate"])
def test_tools_given_a_truncated_checkpoint_print_one_line(tmp_path: Path, tool: str) -> None:
    path, message = damaged_files(tmp_path)["truncated"]
    result = run_module(f"tiny_decoder.{tool}", f"ckpt={path}", *(["sequence=1 2 3"] if tool == "generate" else []))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith(f"error: ckpt={path}: {message}")
