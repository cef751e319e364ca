"""Sequence metrics: grouped accuracy and the random baselines of the design card."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_decoder.training.metrics import RANDOM_BASELINES, GroupAccuracy, SequenceMetrics, bits_per_byte


def test_random_baselines_match_the_card():
    assert RANDOM_BASELINES["acc"] == pytest.approx(0.0039, abs=1e-4)
    assert RANDOM_BASELINES["mad"] == pytest.approx(85.33, abs=5e-3)
    assert RANDOM_BASELINES["loss"] == pytest.approx(5.545, abs=1e-3)
    # the mad baseline is E|X - Y| for independent uniform X, Y on 0..255
    values = torch.arange(256.0)
    assert (values[:, None] - values[None, :]).abs().mean().item() == pytest.approx(RANDOM_BASELINES["mad"])


def test_group_accuracy():
    metric = GroupAccuracy(3)
    metric.update(torch.tensor([True, False, True, True]), torch.tensor([0, 0, 2, 2]))
    metric.update(torch.tensor([False]), torch.tensor([2]))
    acc = metric.compute()
    assert acc[0].item() == pytest.approx(0.5)
    assert math.isnan(acc[1].item())
    assert acc[2].item() == pytest.approx(2 / 3)


def test_sequence_metrics_values():
    metrics = SequenceMetrics(["a", "b"], n_phases=3, num_classes=8)
    target = torch.tensor([[1, 2, 3], [4, 5, 6]])
    prediction = torch.tensor([[1, 2, 3], [4, 5, 0]])  # last position wrong for row 2 (distance 6)
    logits = torch.nn.functional.one_hot(prediction, 8).float()
    batch = {"target": target, "phase": torch.tensor([1, 3]), "family": torch.tensor([0, 1])}
    metrics.update(logits, batch, torch.tensor(2.0))
    values = metrics.compute("val")
    assert values["val/acc"].item() == pytest.approx(5 / 6)
    assert values["val/acc_last"].item() == pytest.approx(0.5)
    assert values["val/mad"].item() == pytest.approx(6 / 6)
    assert values["val/loss"].item() == pytest.approx(2.0)
    assert values["val/phase1_acc_last"].item() == 1.0 and values["val/phase3_acc_last"].item() == 0.0
    assert "val/phase2_acc_last" not in values  # no phase-2 sample seen
    assert values["val_family/a_acc_last"].item() == 1.0 and values["val_family/b_acc_last"].item() == 0.0
    assert values["baseline/mad"].item() == pytest.approx(85.33, abs=5e-3)


def test_bits_per_byte_from_a_known_loss():
    # ln 2 nats per token over 200 bytes of 100 tokens: 1 bit per token, 0.5 bits per byte
    assert bits_per_byte(math.log(2), bytes_per_token=200 / 100) == pytest.approx(0.5)
    assert float(bits_per_byte(torch.tensor(math.log(2)), 200 / 100)) == pytest.approx(0.5)
