"""Smoke tests of the record-making benchmark scripts of earlier studies: each still runs end to end (on tiny
settings, or redrawing from the committed measurements) and writes what its record is made of."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # a few minutes of subprocesses: run by CI with -m slow


def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_finite_difference_benchmark_runs_every_method_and_redraws_its_plots(tmp_path: Path):
    out = tmp_path / "results.jsonl"
    run_script("benchmarks/finite_difference.py", "--steps", "6", "--pilot-steps", "3", "--eval-every", "3",
               "--repeats", "1", "--out", str(out))  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    final = {r["mode"]: r for r in records if r["kind"] == "final"}
    assert sorted(final) == ["backprop", "coordinate", "hybrid", "nspsa16", "nspsa4", "spsa"]
    assert all(r["step"] == 6 and math.isfinite(r["eval_loss"]) for r in final.values())
    assert {"speedup", "memory", "smoothness"} <= {r["kind"] for r in records}
    committed = tmp_path / "committed" / "results.jsonl"
    committed.parent.mkdir()
    shutil.copy(REPO_ROOT / "experiments" / "finite_difference" / "results.jsonl", committed)
    run_script("benchmarks/finite_difference.py", "--plot", str(committed))
    assert sorted(p.name for p in committed.parent.glob("*.png")) == ["loss_vs_step.png", "loss_vs_time.png"]


def test_compression_report_redraws_the_record_from_its_committed_runs(tmp_path: Path):
    committed = REPO_ROOT / "experiments" / "compression"
    record = tmp_path / "compression"
    shutil.copytree(committed, record, ignore=shutil.ignore_patterns("*.png", "results.md"))
    run_script("benchmarks/compression.py", "report", str(record / "runs"), "--out", str(record))
    assert (record / "results.md").read_text() == (committed / "results.md").read_text()
    assert {p.name for p in record.glob("*.png")} == {p.name for p in committed.glob("*.png")}
