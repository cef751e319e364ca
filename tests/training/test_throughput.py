"""Tests for the throughput callback (tiny_decoder.training.throughput): every run logs tokens/s and MFU, with
the FLOPs of PaLM's estimate (6N + 12LdT a token) over the peak (given, or measured on a CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import tiny_sequence_overrides
from tiny_decoder.run.fit import fit_and_test
from tiny_decoder.training.throughput import forward_flops_per_token, measured_matmul_flops, training_flops

SMALL = ["+experiment=sequence_ablation", "model.d_model=16", "model.n_layers=2", "model.d_ff=32"]


def test_flops_of_a_batch_follow_palms_estimate():
    model = SimpleNamespace(num_parameters=lambda: 1000, config=SimpleNamespace(n_layers=2, d_model=16))
    batch = {"input": torch.zeros(4, 8, dtype=torch.long)}
    per_token = 2 * 1000 + 4 * 2 * 16 * 8
    assert forward_flops_per_token(1000, 2, 16, 8) == per_token
    assert training_flops(SimpleNamespace(model=model), batch) == 3 * per_token * 32  # forward + backward
    assert training_flops(SimpleNamespace(model=model), batch, training=False) == per_token * 32


def test_every_run_logs_tokens_per_second_and_mfu(compose_config):
    peak = 1e9
    run = fit_and_test(compose_config(*SMALL, *tiny_sequence_overrides(2), f"callbacks.throughput.peak_flops={peak}"))
    train = run.results["train"]
    tokens_per_s, mfu = train["train/device/items_per_sec"], train["train/device/mfu"]
    config = run.task.model.config
    flops_per_token = 3 * forward_flops_per_token(run.task.model.num_parameters(), config.n_layers, config.d_model, 8)
    assert tokens_per_s > 0
    assert mfu == pytest.approx(tokens_per_s * flops_per_token / peak, rel=1e-3)


def test_cpu_peak_is_a_measured_matmul_rate():
    rate = measured_matmul_flops(torch.float32)
    assert 1e9 < rate < 1e14  # a CPU core does at least a GFLOP/s on a thick matmul and not a hundred TFLOP/s
    assert measured_matmul_flops(torch.float32) == rate  # measured once per process and dtype
