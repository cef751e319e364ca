"""Smoke test: the generation benchmark runs on a tiny shape and reports consistent figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "generation.py"


def test_generation_benchmark_reports_cached_and_recomputed_rates(capsys):
    spec = importlib.util.spec_from_file_location("generation_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--shape", "tiny", "--new", "16", "64", "--repeats", "1"])
    assert [row["new_tokens"] for row in rows] == [16, 64]
    for row in rows:
        assert row["cached_tokens_per_s"] > 0 and row["recomputed_tokens_per_s"] > 0
        assert row["cache_speedup"] == round(row["cached_tokens_per_s"] / row["recomputed_tokens_per_s"], 2)
    assert "speedup" in capsys.readouterr().out
