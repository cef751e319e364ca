"""``benchmarks/run_all.py`` without running the benchmarks: its ``--help`` gives the run time README gives, a
full run judges every target, and a ``--smoke`` run (tiny models, figures meaningless) judges none. The real
smoke run is ``tests/benchmarks/test_benchmarks.py`` (slow)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

# what each benchmark script prints, as JSON lines: the figures every target reads (the default decoding below
# run.c's tokens/s, everything else above its target)
TRAINING = {"benchmark": "training", "attention": "sdpa", "compile": False, "lightning_tokens_per_s": 1000.0,
            "lightning_over_loop": 0.96, "mfu": 0.75, "data_share": 0.001}  # fmt: skip
ROWS = [
    {"benchmark": "machine", "cores": 2, "torch": "2.13.0"},
    {**TRAINING, "experiment": "stories15m", "precision": "32-true"},
    {**TRAINING, "experiment": "stories260k", "precision": "32-true"},
    {**TRAINING, "experiment": "stories15m", "precision": "bf16-mixed", "lightning_tokens_per_s": 1900.0},
    {"benchmark": "generation", "new_tokens": 256, "threads": 1, "auto_over_run_c": 0.7, "fast_over_run_c": 0.6,
     "int8_over_run_c": 1.6, "fast_warmup_s": 0.1},
    {"benchmark": "generation", "new_tokens": 256, "threads": 2, "auto_over_run_c": 0.9, "fast_over_run_c": 0.8,
     "int8_over_run_c": 1.7},
    {"benchmark": "generation_batched", "fast_over_hf": 4.2},
]  # fmt: skip


@pytest.fixture
def run_all(monkeypatch: pytest.MonkeyPatch):
    """The module, with each benchmark script's run replaced by the rows above."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    module = importlib.import_module("run_all")
    monkeypatch.setattr(module, "run_script", lambda command: ROWS)
    return module


def test_help_gives_the_run_time_the_readme_gives():
    result = subprocess.run([sys.executable, "benchmarks/run_all.py", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (readme_line,) = [line for line in (REPO_ROOT / "README.md").read_text().splitlines() if "run_all.py --" in line]
    (readme_minutes,) = re.findall(r"~(\d+) min on 2 cores", readme_line)
    (help_minutes,) = re.findall(r"run_all.py +# ~(\d+) min on a 2-core CPU", result.stdout)
    assert help_minutes == readme_minutes == "35"
    assert "issue" not in result.stdout
    assert "no target is judged" in " ".join(result.stdout.split())  # --smoke's own line says so


def test_a_full_run_judges_every_target(run_all, capsys):
    report = run_all.main([])
    out = capsys.readouterr().out
    verdicts = [t["verdict"] for t in report["targets"]]
    assert verdicts == ["met", "met", "met", "NOT MET", "met", "met", "met", "met", "met", "met"]
    assert [t["met"] for t in report["targets"]] == [v == "met" for v in verdicts]
    assert "\nTargets\n" in out and "issue" not in out
    target = "default decoding (the generate tool's compile=auto, fp32) / run.c tokens/s, batch 1, 1 thread"
    assert f"  {target}: 0.7 (>= 1.0): NOT MET" in out


def test_a_smoke_run_prints_its_figures_and_no_verdict(run_all, capsys):
    report = run_all.main(["--smoke", "--markdown"])
    out = capsys.readouterr().out
    assert report["smoke"] is True
    assert all(t["met"] is None and t["verdict"] == "not judged (smoke)" for t in report["targets"])
    assert "NOT MET" not in out and ": met" not in out and "| met |" not in out and "issue" not in out
    assert "Targets (smoke run on tiny models: figures not comparable, nothing judged)" in out
    target = "default decoding (the generate tool's compile=auto, fp32) / run.c tokens/s, batch 1, 1 thread"
    assert f"  {target}: 0.7 (>= 1.0): not judged (smoke)" in out
    assert f"| {target} | >= | 1 | 0.7 | not judged (smoke) |" in out
