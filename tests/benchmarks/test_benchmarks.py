"""Smoke test of the benchmark suite: ``run_all.py --smoke`` runs every script and code path on a tiny model
(figures meaningless) and reports internally consistent rows and every target's figure, judging none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # a few minutes of subprocesses: run by CI with -m slow


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    if not (REPO_ROOT.parent / "shared" / "data" / "tinystories").is_dir():
        pytest.skip("the benchmarks read ../shared/data/tinystories")
    tmp = tmp_path_factory.mktemp("benchmarks")
    out = tmp / "report.json"
    env = {**os.environ, "TINY_DECODER_CACHE": str(tmp / "cache"), "WANDB_MODE": "disabled", "TMPDIR": str(tmp)}
    result = subprocess.run([sys.executable, "benchmarks/run_all.py", "--smoke", "--markdown", "--out", str(out)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    report["stdout"] = result.stdout
    report["out"] = out
    return report


def test_training_rows_are_consistent(report):
    rows = [r for part in ("overhead", "grid") for r in report["results"][part] if r["benchmark"] == "training"]
    assert {r["precision"] for r in rows} == {"32-true", "bf16-mixed"}
    for row in rows:
        assert row["lightning_tokens_per_s"] > 0 and row["loop_tokens_per_s"] > 0
        assert row["lightning_over_loop"] == round(row["lightning_tokens_per_s"] / row["loop_tokens_per_s"], 3)
        assert row["data_share"] == pytest.approx(row["data_s_per_batch"] / row["step_s"], rel=0.05, abs=1e-4)
        tokens = row["batch_size"] * row["context"]
        achieved = row["flops_per_step"] * row["lightning_tokens_per_s"] / tokens / 1e9
        assert row["achieved_gflops"] == pytest.approx(achieved, abs=0.06)
        assert row["mfu"] > 0 and row["flops_per_step"] > 6 * row["parameters"] * tokens  # fwd+bwd, plus attention
    runs = [r for r in report["results"]["overhead"] if r["benchmark"] == "training_run"]
    assert sorted(r["path"] for r in runs) == ["lightning", "lightning", "loop", "loop"]  # stories15m, stories260k
    assert all(r["steps"] == 2 for r in runs)


def test_generation_rows_are_consistent(report):
    rows = [r for r in report["results"]["generation"] if r["benchmark"] == "generation"]
    assert [r["threads"] for r in rows] == [1]
    for row in rows:
        assert min(row[f"{mode}_tokens_per_s"] for mode in ("fast", "bf16", "int8", "cached")) > 0
        assert row["fast_warmup_s"] >= 0 and "run_c_tokens_per_s" not in row  # no llama2.c in a smoke run
    (batched,) = [r for r in report["results"]["generation"] if r["benchmark"] == "generation_batched"]
    ratio = batched["fast_tokens_per_s"] / batched["hf_tokens_per_s"]
    assert batched["fast_over_hf"] == pytest.approx(ratio, abs=0.01 + ratio * 0.1 / batched["hf_tokens_per_s"])
    # the second process loads the programs the first compiled (same cache): its warm-up is a fraction
    (again,) = [r for r in report["results"]["generation_again"] if r["benchmark"] == "generation"]
    for mode in ("compiled", "compiled_bf16", "compiled_int8"):
        assert again[f"{mode}_warmup_s"] < rows[0][f"{mode}_warmup_s"] / 2 and again[f"{mode}_tokens_per_s"] > 0


def test_every_target_is_measured_and_printed_but_not_judged(report):
    targets = report["targets"]
    # the run.c ratios need llama2.c (LLAMA2C_DIR), which a smoke run does not build: those are "not measured"
    measured = [t for t in targets if "run.c" not in t["target"]]
    assert len(targets) == 10 and len(measured) == 7 and all(t["value"] is not None for t in measured)
    assert report["smoke"] and all(t["met"] is None for t in targets)
    assert all(t["verdict"] == "not judged (smoke)" for t in measured)
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    stdout = report["stdout"]
    assert "\nTargets (smoke run" in stdout and "| Lightning/loop |" in stdout.replace("  ", " ")
    assert "NOT MET" not in stdout and ": met" not in stdout and "Targets (issue" not in stdout


def test_plots_are_drawn_from_the_report(report):
    result = subprocess.run([sys.executable, "benchmarks/plot_results.py", str(report["out"])], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("training.png", "generation.png"):
        png = report["out"].with_name(name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
