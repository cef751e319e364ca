"""``tiny_decoder.report``: a fake multirun (three finished jobs of a one-at-a-time ablation and a failed one)
and a real two-job multirun of ``tiny_decoder.train`` run in a subprocess."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_decoder.report import Job, build_report, main, panel_groups, swept_keys

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# job -> (swept overrides, best val/loss or None for a failed job)
FAKE_JOBS = {
    "0": ([], 2.0),
    "1": (["attention=linformer"], 1.5),
    "2": (["norm=post"], 3.0),
    "3": (["attention=longformer"], None),
}
COMMON = ["+experiment=sequence_seed", "trainer.max_epochs=3"]


def _write_job(job_dir: Path, overrides: list[str], best: float | None) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*COMMON, *overrides]))
    config = {"callbacks": {"model_checkpoint": {"monitor": "val/loss", "mode": "min"}}}
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if best is None:
        (job_dir / "train.log").write_text("[INFO] - starting\nRuntimeError: CUDA out of memory\n[INFO] - bye\n")
        return
    results = {
        "val": {"val/loss": best + 0.5, "val/acc": 0.1, "train/loss": best + 1.0},  # last validation, not the best
        "test": {"test/loss": best + 0.25, "test/acc": 1.0 / best, "baseline/loss": 5.5},
        "best_score": best,
        "parameters": 1000 + int(best * 100),
        "wall_time_s": 10.0 * best,
    }
    (job_dir / "results.json").write_text(json.dumps(results))
    (job_dir / "csv").mkdir()
    rows = [
        {"step": 4, "epoch": 0, "train/loss": best + 2, "val/loss": ""},
        {"step": 9, "epoch": 0, "train/loss": "", "val/loss": best + 1},
        {"step": 19, "epoch": 1, "train/loss": best + 1, "val/loss": best},
    ]
    with (job_dir / "csv" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def fake_multirun(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "sequence" / "2026-01-01" / "12-00-00"
    for name, (overrides, best) in FAKE_JOBS.items():
        _write_job(root / name, overrides, best)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_markdown_table_rows_order_and_values(fake_multirun: Path, capsys: pytest.CaptureFixture) -> None:
    report = main([str(fake_multirun)])
    printed = capsys.readouterr().out
    markdown = (fake_multirun / "results.md").read_text()
    assert markdown in printed
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == [
        "job",
        "attention",
        "norm",
        "status",
        "val/loss",
        "test/acc",
        "test/loss",
        "parameters",
        "wall_time_s",
    ]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in table[2:]]
    assert [row["job"] for row in rows] == ["1", "0", "2", "3"]  # by best val/loss, failed last
    assert [row["val/loss"] for row in rows] == ["1.5", "2", "3", "failed"]  # best_score, not the last value
    assert rows[0] == {
        "job": "1",
        "attention": "linformer",
        "norm": "(default)",
        "status": "ok",
        "val/loss": "1.5",
        "test/acc": "0.6667",
        "test/loss": "1.75",
        "parameters": "1,150",
        "wall_time_s": "15",
    }
    assert rows[3]["status"] == "FAILED" and rows[3]["parameters"] == "-"
    assert "common overrides: +experiment=sequence_seed trainer.max_epochs=3" in markdown
    assert "RuntimeError: CUDA out of memory" in markdown
    assert report.columns == header


def test_csv_content_and_plots(fake_multirun: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    build_report(fake_multirun, ["val/loss"], out)
    with (out / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["job"] for row in rows] == ["1", "0", "2", "3"]
    assert float(rows[0]["val/loss"]) == 1.5 and float(rows[0]["test/acc"]) == pytest.approx(1 / 1.5)
    assert rows[1]["attention"] == "(default)" and rows[2]["norm"] == "post"
    assert rows[3]["status"] == "FAILED" and rows[3]["val/loss"] == "" and rows[3]["parameters"] == ""
    assert rows[3]["error"] == "RuntimeError: CUDA out of memory"
    assert _is_png(out / "results.png") and _is_png(out / "curves.png")
    assert not (fake_multirun / "results.md").exists()


def test_metric_option_and_mode(fake_multirun: Path, tmp_path: Path) -> None:
    report = build_report(fake_multirun, ["test/acc", "val/acc"], tmp_path, mode="max")
    assert [row["job"] for row in report.rows] == ["1", "0", "2", "3"]
    assert report.columns[4:8] == ["test/acc", "val/acc", "test/loss", "parameters"]


def test_bad_directories_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for directory in (tmp_path, tmp_path / "missing"):
        with pytest.raises(SystemExit) as exit_info:
            main([str(directory)])
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err
    assert "not a multirun directory" in errors and "no such directory" in errors


def test_real_multirun(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    train = [
        *(sys.executable, "-m", "tiny_decoder.train", "-m", "+experiment=sequence_seed", "activation=gelu,relu"),
        *("trainer.max_epochs=1", "data.train_samples_per_epoch=320", "data.val_samples=64"),
        *("data.test_samples=64", "logger=csv", f"hydra.sweep.dir={sweep}"),
    ]
    run = subprocess.run(train, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    command = [sys.executable, "-m", "tiny_decoder.report", str(sweep)]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    with (sweep / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["activation"] for row in rows) == ["gelu", "relu"]
    assert all(row["status"] == "ok" and math.isfinite(float(row["val/loss"])) for row in rows)
    assert "| activation |" in run.stdout and _is_png(sweep / "results.png") and _is_png(sweep / "curves.png")


def test_panels_grid_and_one_at_a_time() -> None:
    def job(name: str, **overrides: str) -> Job:
        return Job(name, Path(name), dict(overrides))

    grid = [job("0", a="x", b="u"), job("1", a="x", b="v"), job("2", a="y", b="u"), job("3", a="y", b="v")]
    assert swept_keys(grid) == ["a", "b"]
    assert {option: [j.name for j in jobs] for option, jobs in panel_groups(grid, "a", ["a", "b"]).items()} == {
        "x": ["0", "1"],
        "y": ["2", "3"],
    }
    ablation = [job("0"), job("1", a="x"), job("2", b="v"), job("3", a="y")]
    assert swept_keys(ablation) == ["a", "b"]
    assert {option: [j.name for j in jobs] for option, jobs in panel_groups(ablation, "a", ["a", "b"]).items()} == {
        "(default)": ["0"],
        "x": ["1"],
        "y": ["3"],
    }
