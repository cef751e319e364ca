"""Smoke test of benchmarks/data.py (``--smoke``: one 5 MB corpus): its rows are internally consistent, the
corpus and caches live in the given folder and are gone afterwards, and every issue-16 target is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # ~1 minute of subprocesses


def test_data_benchmark_smoke(tmp_path):
    if not (REPO_ROOT.parent / "shared" / "data" / "tinystories").is_dir():
        pytest.skip("the benchmark reads ../shared/data/tinystories")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "benchmarks/data.py", "--smoke", "--dir", str(tmp_path)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    (prepare,) = [r for r in rows if r["benchmark"] == "data_prepare"]
    assert prepare["file_mb"] == pytest.approx(5, abs=0.01)
    # the rate comes from the unrounded figures; the row's own figures carry enough digits to recompute it
    assert prepare["mb_per_s"] == pytest.approx(prepare["text_mb"] / prepare["prepare_s"], rel=0.01)
    assert prepare["cache_ratio"] == pytest.approx(1, abs=0.05)  # nothing but the token files (and meta.json)
    assert prepare["token_files_mb"] == pytest.approx(2 * prepare["tokens"] / 1e6, abs=0.06)  # uint16
    assert prepare["peak_rss_mb"] > 100
    resumes = [r for r in rows if r["benchmark"] == "data_resume"]
    fractions = (0.1, 0.5, 0.9)
    expected = [int(r["epoch_batches"] * f) for r, f in zip(resumes, fractions, strict=True)]
    assert [r["position"] for r in resumes] == expected
    assert resumes[-1]["skip_s"] < resumes[-1]["replay_s"]
    assert len([r for r in rows if r["benchmark"] == "data_target"]) == 4
    assert list(tmp_path.iterdir()) == []  # corpus, tokenizer and caches removed
