"""Bad inputs fail fast with one clear ``error: ...`` line, no traceback and a non-zero exit code: a table of
cases run through the real entry point (in this process, see ``run_train``), and a few as real processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from tests.helpers import CONF_DIR, run_module, run_train, tiny_sequence_overrides
from tiny_decoder.run.fit import fit_and_test

TINY = ["+experiment=sequence_strong", *tiny_sequence_overrides(epochs=1), "~callbacks.attention_maps"]
SMALL_MODEL = ["model.d_model=32", "model.n_layers=1", "model.d_ff=64"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real last.ckpt of the TINY + SMALL_MODEL run, a truncated copy and a file of random bytes."""
    root = tmp_path_factory.mktemp("checkpoints")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *SMALL_MODEL, "test=false"])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.resume_dir = str(root / "run")
    fit_and_test(cfg)
    good = root / "run" / "checkpoints" / "last.ckpt"
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = root / "corrupt.ckpt"
    corrupt.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    return {"good": good, "truncated": truncated, "corrupt": corrupt}


# (case, overrides; {good}/{truncated}/{corrupt} are checkpoint paths, expected exit code, message fragment)
CASES = [
    ("unknown option", [*TINY, "attention=foo"], 2, "Could not find 'attention/foo'; available options: linformer"),
    (
        "unknown key",
        [*TINY, "model.foo=1"],
        2,
        "Could not override 'model.foo'. To append to your config use +model.foo=1",
    ),
    (
        "malformed override",
        [*TINY, "model.d_model=[1,"],
        2,
        "cannot parse the override 'model.d_model=[1,': no viable alternative",
    ),
    ("negative lr", [*TINY, "optimizer.lr=-0.001"], 2, "optimizer.lr must be a positive number, got -0.001"),
    ("negative weight decay", [*TINY, "optimizer.weight_decay=-1"], 2, "optimizer.weight_decay must be >= 0, got -1"),
    ("negative warmup", [*TINY, "scheduler.warmup_steps=-5"], 2, "scheduler.warmup_steps must be an integer >= 0"),
    ("dropout > 1", [*TINY, "model.dropout=1.5"], 2, "model.dropout must be in [0, 1), got 1.5"),
    (
        "context longer than the positional table",
        [*TINY, "model.context_length=4"],
        2,
        "the data's sequences (8 tokens) are longer than the model's context / positional table "
        "(model.context_length=4)",
    ),
    ("vocabulary larger than the model's", [*TINY, "model.vocab_size=100"], 2, "the data has 256 token ids"),
    (
        "missing data file",
        ["+experiment=stories_tiny", "data.files.train=/nonexistent/stories.txt", "logger=csv"],
        2,
        "data.files.train: no such file /nonexistent/stories.txt",
    ),
    ("required data file not given", ["+experiment=shakespeare_char"], 2, "Missing mandatory value: data.files.train"),
    ("missing checkpoint", [*TINY, "resume=/nonexistent/last.ckpt"], 2, "resume=/nonexistent/last.ckpt: no such"),
    ("corrupt checkpoint", [*TINY, *SMALL_MODEL, "resume={corrupt}"], 2, "cannot read this checkpoint"),
    ("truncated checkpoint", [*TINY, *SMALL_MODEL, "resume={truncated}"], 2, "truncated, corrupt or not a Lightning"),
    ("torch_threads 0", [*TINY, "torch_threads=0"], 2, "torch_threads must be a positive integer, auto or null"),
    ("a root key nothing reads", [*TINY, "+some_misspelled_key=1"], 2, "+some_misspelled_key: nothing reads"),
    ("a misspelled path", [*TINY, "+paths.outptu=x"], 2, "it is not a field of the config node paths, and paths"),
    ("a Trainer argument misspelled", [*TINY, "+trainer.profilr=simple"], 2, "did you mean trainer.profiler?"),
    ("an optimizer argument misspelled", [*TINY, "+optimizer.lrr=3"], 2, "adamw takes no argument 'lrr'"),
    (
        "checkpoint of another model",
        [*TINY, *SMALL_MODEL, "model.d_model=64", "resume={good}"],
        2,
        "the checkpoint's model differs from this config: model.d_model: 32 in the checkpoint, 64 here",
    ),
    (
        "non-finite loss",
        [
            *TINY,
            *SMALL_MODEL,
            "scheduler=constant",
            "optimizer.lr=1e4",
            "callbacks.periodic_checkpoint.every_n_train_steps=1",
        ],
        3,
        "non-finite training loss (nan) at step 5 (epoch 0, batch 4); stopped. Last good checkpoint: ",
    ),
]


@pytest.mark.parametrize(("overrides", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_an_exit_code(
    overrides: list[str],
    code: int,
    message: str,
    checkpoints: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    args = [arg.format(**{name: str(path) for name, path in checkpoints.items()}) for arg in overrides]
    assert run_train(monkeypatch, *args, f"hydra.run.dir={tmp_path}", f"paths.resume_dir={tmp_path}") == code
    errors = capsys.readouterr().err
    lines = [line for line in errors.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], errors[-2000:]
    assert "Traceback" not in errors


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    *_, (name, overrides, code, _message) = CASES
    assert name == "non-finite loss"
    assert run_train(monkeypatch, *overrides, f"hydra.run.dir={tmp_path}") == code
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4  # the step before the loss became NaN
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())
    assert str(tmp_path / "checkpoints" / "last.ckpt") in capsys.readouterr().err
    assert "NonFiniteLossError" in (tmp_path / "error.txt").read_text()
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown option", "negative lr", "context longer than the positional table"])
def test_bad_input_as_a_real_process(case: str, tmp_path: Path):
    (overrides, code, message) = next(c[1:] for c in CASES if c[0] == case)
    result = run_module("tiny_decoder.train", *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode == code
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "added", ["+trainer.profiler=simple", "+callbacks.timer._target_=lightning.pytorch.callbacks.Timer"]
)
def test_added_keys_a_component_reads_keep_working(added: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``+key=value`` is refused only where nothing reads it: a Trainer argument or a new callback is fine."""
    assert run_train(monkeypatch, *TINY, added, f"hydra.run.dir={tmp_path}") == 0
    assert (tmp_path / "results.json").is_file()


def test_the_hub_default_without_a_network_is_one_line_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """``+experiment=stories_tiny`` with no network and no local files: one line saying how to pass files, without
    the Hub client's ~30 s of retries (no host resolves here, as on this project's machines)."""
    monkeypatch.setattr("tiny_decoder.data.text_formats.hub_reachable", lambda host="huggingface.co": False)
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    started = time.perf_counter()
    code = run_train(monkeypatch, "+experiment=stories_tiny", "debug=fast", f"hydra.run.dir={tmp_path}",
                     f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert code == 2 and time.perf_counter() - started < 60
    errors = capsys.readouterr().err
    lines = [line for line in errors.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in errors
    assert "cannot be reached; pass local files instead: data.files.train=PATH [data.files.validation=PATH]" in lines[0]


def test_data_files_as_one_path_is_the_training_file(shared_data: Path, tmp_path: Path):
    stories = shared_data / "tinystories" / "tinystories_3000.txt"
    overrides = [f"data.files={stories}", "data.max_train_docs=300", f"data.cache_dir={tmp_path / 'cache'}"]
    result = run_module("tiny_decoder.train", "+experiment=stories_tiny", "debug=fast", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("outputs/lm/*/*/results.json"))
