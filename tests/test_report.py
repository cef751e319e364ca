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


@pytest.mark.slow  # processes / compilation: tens of seconds (CI runs -m slow too)
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


# --------------------------------------------------------------------------------------------------------
# Arms: seed-replicated comparison
# --------------------------------------------------------------------------------------------------------

# t(0.975, df) in closed form: df=2: 0.95 * sqrt(2 / (4 * 0.975 * 0.025)); df=1: tan(0.475 pi)
T2 = 0.95 * math.sqrt(2 / 0.0975)  # 4.30265272974946
T1 = math.tan(0.475 * math.pi)  # 12.706204736174694

# arm overrides -> {seed: best val/loss, None: failed}
SEED_JOBS = {
    (): {0: 2.0, 1: 2.2, 2: 2.1},
    ("attention=linformer",): {0: 1.8, 1: 2.1, 2: 1.9},
    ("norm=post",): {0: 2.5, 1: None, 2: 2.7},
    ("positional=rope",): {3: 1.0, 4: 1.1, 5: 1.2},
    ("activation=relu",): {0: 2.05},
}


def _write_seed_job(job_dir: Path, overrides: list[str], seed: int, best: float | None, override: bool = True) -> None:
    """A job of a seed sweep; ``override=False``: the seed only in .hydra/config.yaml (not on the command line)."""
    _write_job(job_dir, [*overrides, *([f"seed={seed}"] if override else [])], best)
    config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**config, "seed": seed}))


@pytest.fixture
def seed_multirun(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "seeds"
    number = 0
    for overrides, seeds in SEED_JOBS.items():
        for seed, best in seeds.items():
            _write_seed_job(root / str(number), list(overrides), seed, best)
            number += 1
    return root


def _rows(rows: list[dict], metric: str = "val/loss") -> dict[str, dict]:
    return {row["arm"]: row for row in rows if row["metric"] == metric}


def _table(markdown: str, heading: str) -> dict[str, dict[str, str]]:
    """The arm table under ``## heading`` of arms.md: arm -> column -> cell."""
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    return {row["arm"]: row for row in rows}


def test_arm_statistics(seed_multirun: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    report = main([str(seed_multirun), "--out", str(out)])
    rows = _rows(report.arms)
    assert list(rows) == ["(default)", "attention=linformer", "norm=post", "positional=rope", "activation=relu"]

    # baseline 2.0, 2.2, 2.1: mean 2.1, sd sqrt((0.1^2 + 0.1^2 + 0) / 2) = 0.1, CI 2.1 -+ T2 * 0.1 / sqrt(3)
    base = rows["(default)"]
    half = T2 * 0.1 / math.sqrt(3)  # 0.24841377
    assert (base["n"], base["n_failed"], base["seeds"]) == (3, 0, "0, 1, 2")
    assert base["mean"] == pytest.approx(2.1) and base["sd"] == pytest.approx(0.1)
    assert (base["ci_low"], base["ci_high"]) == (pytest.approx(2.1 - half), pytest.approx(2.1 + half))
    assert (base["min"], base["max"], base["verdict"]) == (2.0, 2.2, "baseline")

    # linformer 1.8, 2.1, 1.9: mean 1.93333, sd sqrt(0.07 / 3) = 0.152753 (squares 0.017778 + 0.027778 + 0.001111)
    # paired diffs -0.2, -0.1, -0.2: mean -0.166667, sd sqrt(0.01 / 3) = 0.057735, CI [-0.310088, -0.023245]: better
    lin = rows["attention=linformer"]
    sd, diff_sd = math.sqrt(0.07 / 3), math.sqrt(0.01 / 3)
    assert lin["mean"] == pytest.approx(5.8 / 3) and lin["sd"] == pytest.approx(sd)
    assert lin["ci_low"] == pytest.approx(5.8 / 3 - T2 * sd / math.sqrt(3))
    assert lin["ci_high"] == pytest.approx(5.8 / 3 + T2 * sd / math.sqrt(3))
    assert (lin["n_pairs"], lin["paired_seeds"], lin["baseline"]) == (3, "0 1 2", "(default)")
    assert lin["diff_mean"] == pytest.approx(-0.5 / 3) and lin["diff_sd"] == pytest.approx(diff_sd)
    assert lin["diff_ci_low"] == pytest.approx(-0.5 / 3 - T2 * diff_sd / math.sqrt(3)) == pytest.approx(-0.3100884)
    assert lin["diff_ci_high"] == pytest.approx(-0.5 / 3 + T2 * diff_sd / math.sqrt(3)) == pytest.approx(-0.0232449)
    assert lin["verdict"] == "better"

    # norm=post: seed 1 failed; 2.5, 2.7: mean 2.6, sd sqrt(0.02), CI 2.6 -+ T1 * 0.1; diffs 0.5, 0.6 on seeds 0, 2:
    # mean 0.55, sd sqrt(0.005), CI 0.55 -+ T1 * 0.05 = [-0.0853, 1.1853]: within noise
    post = rows["norm=post"]
    assert (post["n"], post["n_failed"], post["failed_jobs"], post["seeds"]) == (2, 1, "7", "0, 2; failed: 1")
    assert post["mean"] == pytest.approx(2.6) and post["sd"] == pytest.approx(math.sqrt(0.02))
    assert (post["ci_low"], post["ci_high"]) == (pytest.approx(2.6 - T1 * 0.1), pytest.approx(2.6 + T1 * 0.1))
    assert (post["n_pairs"], post["paired_seeds"]) == (2, "0 2")
    assert post["diff_mean"] == pytest.approx(0.55) and post["diff_sd"] == pytest.approx(math.sqrt(0.005))
    assert post["diff_ci_low"] == pytest.approx(0.55 - T1 * 0.05) and post["verdict"] == "within noise"

    # positional=rope: seeds 3, 4, 5 against 0, 1, 2: its own interval, no pairs
    rope = rows["positional=rope"]
    assert rope["n"] == 3 and rope["mean"] == pytest.approx(1.1) and rope["ci_low"] == pytest.approx(1.1 - half)
    assert (rope["verdict"], rope["n_pairs"]) == ("unpaired", 0) and math.isnan(rope["diff_mean"])
    assert math.isnan(rope["diff_ci_low"]) and "no seed in common" in rope["note"]

    # activation=relu: one seed: no interval; one pair (seed 0: 2.05 - 2.0)
    relu = rows["activation=relu"]
    assert relu["n"] == 1 and relu["mean"] == 2.05 and math.isnan(relu["sd"]) and math.isnan(relu["ci_low"])
    assert relu["diff_mean"] == pytest.approx(0.05) and math.isnan(relu["diff_ci_low"])
    assert relu["verdict"] == "n/a (n<2 pairs)"

    # test/loss (= best + 0.25 for every job) is summarised too, with the same differences
    tests = _rows(report.arms, "test/loss")
    assert tests["(default)"]["mean"] == pytest.approx(2.35) and tests["attention=linformer"]["verdict"] == "better"

    # arms.md, printed too
    markdown = (out / "arms.md").read_text()
    assert markdown in capsys.readouterr().out and markdown == report.arms_markdown
    table = _table(markdown, "val/loss (min: lower is better)")
    assert table["(default)"]["95% CI"] == "[1.852, 2.348]" and table["(default)"]["sd"] == "0.1"
    assert table["attention=linformer"]["diff 95% CI"] == "[-0.3101, -0.02324]"
    assert table["norm=post"]["n"] == "2 (1 failed)" and table["norm=post"]["verdict"] == "within noise"
    assert table["activation=relu"]["95% CI"] == "n=1: no interval" and table["activation=relu"]["sd"] == "-"
    assert table["positional=rope"]["verdict"] == "unpaired" and table["positional=rope"]["diff 95% CI"] == "-"
    assert "- job 7 (arm norm=post, seed 1): RuntimeError: CUDA out of memory" in markdown
    assert "baseline: (default) (the arm with no swept override)" in markdown

    # arms.csv: the same rows at full precision
    with (out / "arms.csv").open(newline="") as handle:
        saved = _rows(list(csv.DictReader(handle)))
    assert float(saved["attention=linformer"]["diff_ci_low"]) == lin["diff_ci_low"]
    assert float(saved["(default)"]["ci_high"]) == base["ci_high"]
    assert saved["activation=relu"]["ci_low"] == "" and saved["positional=rope"]["diff_mean"] == ""
    assert _is_png(out / "arms.png") and _is_png(out / "curves.png") and report.files["arms_csv"] == out / "arms.csv"


def test_mode_max_flips_the_verdict(seed_multirun: Path, tmp_path: Path) -> None:
    rows = _rows(build_report(seed_multirun, ["val/loss"], tmp_path, mode="max").arms)
    assert rows["attention=linformer"]["verdict"] == "worse"  # a lower value is now the worse one
    assert rows["attention=linformer"]["diff_mean"] == pytest.approx(-0.5 / 3)
    assert rows["norm=post"]["verdict"] == "within noise"
    assert rows["attention=linformer"]["mode"] == "max"


def test_modes_per_metric(seed_multirun: Path, tmp_path: Path) -> None:
    """test/acc (1 / best) is higher-is-better by its name; the monitored val/loss and its test/ twin are min."""
    report = build_report(seed_multirun, ["val/loss", "test/acc"], tmp_path)
    modes = {row["metric"]: row["mode"] for row in report.arms}
    assert modes == {"val/loss": "min", "test/acc": "max", "test/loss": "min"}
    # linformer's test/acc 1/1.8, 1/2.1, 1/1.9 against 1/2.0, 1/2.2, 1/2.1: diffs 0.05556, 0.02165, 0.05013, mean
    # 0.04244, sd 0.01821, CI 0.04244 -+ 4.30265 * 0.01821 / sqrt(3) = [-0.00280, 0.08769]: contains 0
    diffs = [1 / 1.8 - 1 / 2.0, 1 / 2.1 - 1 / 2.2, 1 / 1.9 - 1 / 2.1]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    row = _rows(report.arms, "test/acc")["attention=linformer"]
    assert row["diff_mean"] == pytest.approx(mean) and row["diff_sd"] == pytest.approx(sd)
    assert row["diff_ci_low"] == pytest.approx(mean - T2 * sd / math.sqrt(3))
    assert row["diff_ci_low"] == pytest.approx(-0.0028046, abs=1e-7) and row["verdict"] == "within noise"


def test_baseline_option_picks_the_arm(seed_multirun: Path, tmp_path: Path) -> None:
    report = main([str(seed_multirun), "--out", str(tmp_path), "--baseline", "attention=linformer"])
    rows = _rows(report.arms)
    assert list(rows)[0] == "attention=linformer" and rows["attention=linformer"]["verdict"] == "baseline"
    default = rows["(default)"]
    # the default arm minus linformer: +0.2, +0.1, +0.2: mean 0.166667, CI [0.023245, 0.310088]: worse
    assert default["baseline"] == "attention=linformer" and default["diff_mean"] == pytest.approx(0.5 / 3)
    assert default["diff_ci_low"] == pytest.approx(0.0232449) and default["verdict"] == "worse"
    assert "baseline: attention=linformer (--baseline attention=linformer)" in report.arms_markdown
    # the shared overrides may be named too; "(default)" names the arm without swept overrides
    again = build_report(seed_multirun, out=tmp_path, baseline="+experiment=sequence_seed attention=linformer")
    assert _rows(again.arms)["(default)"]["baseline"] == "attention=linformer"
    assert _rows(build_report(seed_multirun, out=tmp_path, baseline="(default)").arms)["norm=post"]["n_pairs"] == 2


def test_bad_baseline_is_one_error_line(seed_multirun: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(seed_multirun), "--out", str(tmp_path / "out"), "--baseline", "attention=sdpa"])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        "error: --baseline 'attention=sdpa' matches no arm; the arms: (default), attention=linformer, norm=post, "
        "positional=rope, activation=relu"
    ]
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_no_default_baseline(tmp_path: Path) -> None:
    """A grid (every job sets a swept key): no paired columns, and the table says why."""
    root = tmp_path / "grid"
    for number, (attention, seed, best) in enumerate([("a", 0, 1.0), ("a", 1, 1.2), ("b", 0, 2.0), ("b", 1, 2.4)]):
        _write_seed_job(root / str(number), [f"attention={attention}"], seed, best)
    report = build_report(root)
    rows = _rows(report.arms)
    assert list(rows) == ["attention=a", "attention=b"]
    assert {row["verdict"] for row in rows.values()} == {"n/a (no baseline)"}
    assert all(math.isnan(row["diff_mean"]) for row in rows.values())
    assert "every arm sets a swept override, so there is no default baseline arm" in report.arms_markdown
    # mean 1.1, sd sqrt(0.02), CI 1.1 -+ T1 * 0.1
    assert rows["attention=a"]["ci_low"] == pytest.approx(1.1 - T1 * 0.1)
    assert _rows(build_report(root, baseline="attention=a").arms)["attention=b"]["diff_mean"] == pytest.approx(1.1)


def test_seed_from_config_and_duplicate_seeds(tmp_path: Path) -> None:
    """A job without a seed= override has its config's seed; two jobs of an arm with one seed are flagged."""
    root = tmp_path / "mixed"
    _write_seed_job(root / "0", [], 0, 2.0, override=False)  # seed 0 from .hydra/config.yaml
    _write_seed_job(root / "1", [], 1, 2.2)
    _write_seed_job(root / "2", ["norm=post"], 0, 2.5, override=False)
    _write_seed_job(root / "3", ["norm=post"], 1, 2.9)
    _write_seed_job(root / "4", ["attention=linformer"], 0, 1.8)
    _write_seed_job(root / "5", ["attention=linformer"], 0, 1.9, override=False)  # seed 0 again
    report = build_report(root)
    rows = _rows(report.arms)
    assert rows["(default)"]["seeds"] == "0, 1" and rows["(default)"]["n"] == 2
    assert rows["norm=post"]["paired_seeds"] == "0 1" and rows["norm=post"]["diff_mean"] == pytest.approx(0.6)
    dup = rows["attention=linformer"]
    assert dup["verdict"] == "n/a (duplicate seeds)" and dup["note"] == "seed 0 used by jobs 4, 5"
    assert dup["n"] == 2 and dup["mean"] == pytest.approx(1.85)
    assert "- arm attention=linformer: seed 0, jobs 4, 5" in report.arms_markdown


def test_single_seed_sweep_has_arms_without_intervals(fake_multirun: Path, capsys: pytest.CaptureFixture) -> None:
    report = main([str(fake_multirun)])
    assert "every arm has one job (no seed replicates): no intervals" in capsys.readouterr().out
    rows = _rows(report.arms)
    assert [row["n"] for row in rows.values()] == [1, 1, 1, 0]
    assert rows["attention=longformer"]["n_failed"] == 1 and rows["attention=longformer"]["failed_jobs"] == "3"
    table = _table(report.arms_markdown, "val/loss (min: lower is better)")
    assert table["attention=longformer"]["n"] == "0 (1 failed)" and table["attention=longformer"]["mean"] == "-"
    assert table["(default)"]["95% CI"] == "n=1: no interval"
    assert table["norm=post"]["verdict"] == "unpaired"  # these fabricated jobs have no seed at all
