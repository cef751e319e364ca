"""Training from an imported model (``init_from=`` a ``convert``ed checkpoint): a language model trained here, exported
to a Hugging Face folder and converted back, scores exactly what it scored when it was saved (the data tokenized
with the checkpoint's own tokenizer, not a new one), and a run whose model options differ fails naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import SHARED_DATA, run_tool, run_train

pytest.importorskip("transformers")

STORIES = SHARED_DATA / "tinystories" / "tinystories_3000.txt"
RECIPE = [
    "+experiment=stories_tiny",  # Llama-style: pre-RMSNorm, SwiGLU, RoPE, tied, no biases
    f"data.files.train={STORIES}",
    "data.vocab_size=300",
    "data.context_length=32",
    "data.batch_size=8",
    "data.max_val_blocks=8",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=64",
    "trainer.val_check_interval=3",
    "trainer.precision=32-true",
    "logger=csv",
]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path]:
    """(the trained run's folder, the checkpoint converted from its Hugging Face export)."""
    if not STORIES.is_file():
        pytest.skip(f"shared stories not found at {STORIES}")
    folder = tmp_path_factory.mktemp("fine_tune")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TINY_DECODER_CACHE", str(folder / "cache"))
        assert run_train(monkeypatch, *RECIPE, "trainer.max_steps=3", f"hydra.run.dir={folder / 'trained'}") == 0
        saved = folder / "trained" / "checkpoints" / "last.ckpt"
        assert run_tool(monkeypatch, "export", f"ckpt={saved}", "format=hf", f"out={folder / 'hf'}") == 0
        assert run_tool(monkeypatch, "convert", f"src={folder / 'hf'}", f"out={folder / 'imported.ckpt'}") == 0
    return folder / "trained", folder / "imported.ckpt"


def test_an_imported_model_scores_what_it_scored_when_saved(imported, tmp_path, monkeypatch):
    trained, checkpoint = imported
    monkeypatch.setenv("TINY_DECODER_CACHE", str(tmp_path / "other_cache"))  # no tokenizer to reuse: it must come
    run = tmp_path / "scored"  # from the checkpoint (a new one trained on the data would give other ids)
    assert (
        run_train(monkeypatch, *RECIPE, "trainer.max_steps=0", f"init_from={checkpoint}", f"hydra.run.dir={run}") == 0
    )
    assert results(run)["val"]["val/loss"] == pytest.approx(results(trained)["val"]["val/loss"], rel=1e-6)


def test_a_run_with_other_model_options_fails_naming_them(imported, tmp_path, monkeypatch, capsys):
    _, checkpoint = imported
    args = [*RECIPE, "activation=gelu", f"init_from={checkpoint}", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_train(monkeypatch, *args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: init_from={checkpoint}: the checkpoint's model differs")
    assert "model.activation.name: swiglu in the checkpoint, gelu here" in lines[0]
