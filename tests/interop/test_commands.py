"""The export and convert commands on bad input: each case ends with exit code 2 and one ``error:`` line naming
the field and the fix, and leaves nothing behind (no half-written folder or checkpoint)."""

from __future__ import annotations

import pytest

from tests.helpers import REPO_ROOT, run_tool
from tests.interop.models import GPT2, LLAMA, bpe_tokenizer, checkpoint
from tiny_decoder.interop import llama2c
from tiny_decoder.interop.llama import llama_weights
from tiny_decoder.tasks import load_task

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    tokenizer = bpe_tokenizer()
    return {
        "llama": checkpoint(folder, tokenizer, "llama", **LLAMA),
        "gpt2": checkpoint(folder, tokenizer, "gpt2", **GPT2),
    }


def failure(monkeypatch, capsys, tool: str, *args: str) -> str:
    code = run_tool(monkeypatch, tool, *args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    return lines[0]


def test_export_refuses_bad_input_and_writes_nothing(monkeypatch, capsys, tmp_path, checkpoints):
    out = tmp_path / "out"
    cases = {
        f"ckpt={checkpoints['gpt2']} format=llama2c": "llama2c cannot hold this model: it has positional=learned",
        f"ckpt={checkpoints['llama']} format=onnx": "format=onnx: choose one of hf, llama2c",
        f"ckpt={REPO_ROOT / 'tests/fixtures/v1_sequence.ckpt'} format=hf": "this checkpoint has no tokenizer",
        f"ckpt={tmp_path / 'missing.ckpt'} format=hf": "no such checkpoint file",
    }
    for args, message in cases.items():
        assert message in failure(monkeypatch, capsys, "export", *args.split(), f"out={out}")
        assert list(tmp_path.iterdir()) == []
    out.mkdir()
    assert "exists: choose a new folder" in failure(
        monkeypatch, capsys, "export", f"ckpt={checkpoints['llama']}", "format=hf", f"out={out}"
    )


def test_convert_refuses_bad_input_and_writes_nothing(monkeypatch, capsys, tmp_path, checkpoints):
    shape, weights = llama_weights(load_task(checkpoints["llama"]).model)
    llama2c.write_model_bin(tmp_path / "model.bin", shape, weights)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.bin").write_bytes(data[:1000])
    (tmp_path / "wrong.json").write_text("{}")
    out = tmp_path / "new.ckpt"
    cases = {
        f"src={tmp_path / 'model.bin'}": "llama2.c files carry no tokenizer and none lies beside it; give tokenizer=",
        f"src={tmp_path / 'cut' / 'model.bin'} tokenizer={tmp_path / 'wrong.json'}": "the file is truncated",
        f"src={tmp_path / 'nothing'}": "no such file or folder",
        f"src={tmp_path}": "a folder without config.json is not a Hugging Face model",
        f"src={tmp_path / 'model.bin'} tokenizer={tmp_path / 'absent.model'}": "tokenizer=",
    }
    for args, message in cases.items():
        assert message in failure(monkeypatch, capsys, "convert", *args.split(), f"out={out}")
        assert not out.exists()
    assert "exists: choose a new file" in failure(
        monkeypatch, capsys, "convert", f"src={tmp_path / 'model.bin'}", f"out={checkpoints['llama']}"
    )
