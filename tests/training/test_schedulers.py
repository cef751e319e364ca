"""Warmup-cosine and constant schedules: learning rates at known steps."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.training.schedulers import constant, warmup_cosine


def lrs(scheduler_fn, steps: int, base_lr: float = 1.0, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = scheduler_fn(optimizer, total_steps=steps, **kwargs)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    values.append(optimizer.param_groups[0]["lr"])
    return values


def test_warmup_then_cosine_to_min_lr():
    values = lrs(warmup_cosine, 110, warmup_steps=10, min_lr=1e-3)
    assert values[0] == pytest.approx(1 / 11)  # linear warmup starts at 1/(warmup+1)
    assert values[5] == pytest.approx(6 / 11)
    assert values[10] == pytest.approx(1.0)  # peak at the end of warmup
    halfway = 1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * 50 / 100)) / 2
    assert values[60] == pytest.approx(halfway, rel=1e-6)
    assert values[110] == pytest.approx(1e-3, rel=1e-6)
    assert all(a >= b - 1e-12 for a, b in zip(values[10:], values[11:], strict=False))  # monotone decay


def test_warmup_longer_than_training_is_capped():
    values = lrs(warmup_cosine, 20, warmup_steps=5000, min_lr=0.0)
    assert max(values) == pytest.approx(1.0)


def test_constant_with_warmup():
    values = lrs(constant, 30, warmup_steps=4)
    assert values[0] == pytest.approx(0.2)
    assert values[4:] == pytest.approx([1.0] * 27)


def test_bad_values():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="warmup_steps must be an integer >= 0"):
        warmup_cosine(optimizer, total_steps=10, warmup_steps=-1)
