"""``benchmarks/memory.py``: the child's peak RSS is measured for that child alone, and (slow: every recipe, ~10
min on 2 cores) one ``debug=fast`` batch of every recipe peaks at <= 4 GB with the estimate within 30%."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from tests.helpers import REPO_ROOT, SHARED_DATA


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    return importlib.import_module("memory")


def test_the_peak_is_the_childs_own(memory):
    """Two children one after the other: each reports its own peak, not the larger one's nor this process's."""
    allocate = "import numpy; a = numpy.ones({} * 2**20 // 8); print(a.sum())"
    env = dict(os.environ)
    _, big, _, _ = memory.child_peak([sys.executable, "-c", allocate.format(300)], env)
    code, small, _, output = memory.child_peak([sys.executable, "-c", allocate.format(20)], env)
    assert code == 0 and float(output) == 20 * 2**20 // 8
    assert big >= 300 and small < 100  # numpy and 20 MB: far below this pytest process's own resident memory


def test_every_recipe_is_measured_and_the_lm_recipes_read_the_shared_files(memory):
    assert memory.recipes() == [
        "sequence_ablation", "sequence_fd", "sequence_seed", "sequence_strong",
        "shakespeare_char", "stories15m", "stories260k", "stories_tiny",
    ]  # fmt: skip
    assert memory.data_overrides("sequence_seed") == ()
    assert memory.data_overrides("shakespeare_char") == memory.SHAKESPEARE_FILES
    assert memory.data_overrides("stories260k") == memory.STORIES_FILES


@pytest.mark.slow
def test_every_recipe_trains_one_batch_in_4_gb_with_the_estimate_within_30_percent(memory, capsys):
    if not (SHARED_DATA / "tinystories").is_dir():
        pytest.skip(f"the language-model recipes read {SHARED_DATA}")
    rows = memory.main([])
    assert [row["experiment"] for row in rows] == memory.recipes()
    for row in rows:
        assert row["measured_mib"] <= 4e9 / 2**20, row
        assert abs(row["estimated_mib"] / row["measured_mib"] - 1) <= 0.30, row
    shrunk = {row["experiment"]: row["batch_size"] for row in rows if row["shrunk"]}
    assert shrunk == {"stories15m": 32}  # the one recipe whose batch (128) needs more than 4 GB
    assert "estimate/peak" in capsys.readouterr().out
