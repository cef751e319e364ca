"""``torch_threads``: ``auto`` trains a small model on one intra-op thread and leaves a large one at torch's
default; a number is taken as it is."""

from __future__ import annotations

import pytest
import torch

from tiny_decoder.run.build import SMALL_MODEL_PARAMETERS, set_threads


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_auto_uses_one_thread_below_the_small_model_size() -> None:
    assert set_threads("auto", SMALL_MODEL_PARAMETERS - 1) == 1


def test_auto_leaves_a_large_model_at_the_default_and_a_number_is_taken() -> None:
    torch.set_num_threads(2)
    assert set_threads("auto", SMALL_MODEL_PARAMETERS) == 2
    assert set_threads(None, 10) == 2
    assert set_threads(1, SMALL_MODEL_PARAMETERS * 10) == 1
