"""The distance-weighted cross-entropy against hand-computed values (design card's loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.training.losses import distance_weighted_cross_entropy, next_token_cross_entropy


def one_hot_logits(peaks: list[int], num_classes: int = 256, height: float = 5.0) -> torch.Tensor:
    logits = torch.zeros(len(peaks), num_classes)
    logits[torch.arange(len(peaks)), torch.tensor(peaks)] = height
    return logits


def test_card_example_argmax_linear():
    # true = 10; a prediction peaking at 100 is weighted 1 + 0.1 * 90 = 10, one peaking at 11 by 1.1
    targets = torch.tensor([10, 10])
    logits = one_hot_logits([100, 11])
    ce = F.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(ce[0], ce[1])  # plain CE cannot tell the two mistakes apart
    ce_value = math.log(255 + math.exp(5.0)) - 0.0  # logit of the true class is 0
    expected = (ce_value * 10.0 + ce_value * 1.1) / 2
    loss = distance_weighted_cross_entropy(logits, targets, alpha=0.1, weighting="linear", prediction="argmax")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    far = distance_weighted_cross_entropy(logits[:1], targets[:1])
    near = distance_weighted_cross_entropy(logits[1:], targets[1:])
    assert (far / near).item() == pytest.approx(10.0 / 1.1, rel=1e-6)


@pytest.mark.parametrize(("weighting", "weight"), [("linear", 4.0), ("quadratic", 16.0), ("sqrt", 2.0)])
def test_weightings(weighting: str, weight: float):
    targets = torch.tensor([[3]])
    logits = one_hot_logits([7]).view(1, 1, -1)
    ce = F.cross_entropy(logits.view(1, -1), targets.view(-1)).item()
    loss = distance_weighted_cross_entropy(logits, targets, alpha=0.5, weighting=weighting)
    assert loss.item() == pytest.approx(ce * (1 + 0.5 * weight), rel=1e-6)


def test_correct_prediction_is_plain_cross_entropy_and_alpha_zero_too():
    targets = torch.tensor([4, 200])
    logits = one_hot_logits([4, 200])
    plain = F.cross_entropy(logits, targets)
    assert torch.allclose(distance_weighted_cross_entropy(logits, targets), plain)
    wrong = one_hot_logits([9, 3])
    assert torch.allclose(distance_weighted_cross_entropy(wrong, targets, alpha=0.0), F.cross_entropy(wrong, targets))


def test_expected_value_prediction_is_differentiable_and_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 256, requires_grad=True)
    targets = torch.randint(0, 256, (2, 3))
    loss = distance_weighted_cross_entropy(logits, targets, alpha=0.1, prediction="expected")
    expected_value = torch.softmax(logits, -1) @ torch.arange(256.0)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 3)
    manual = (ce * (1 + 0.1 * (expected_value - targets).abs())).mean()
    assert torch.allclose(loss, manual)
    loss.backward()
    # the distance term contributes gradient beyond plain CE's
    ce_only = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ce_only.flatten(0, 1), targets.flatten()).backward()
    assert not torch.allclose(logits.grad, ce_only.grad)


def test_all_positions_count_mean_over_length():
    targets = torch.tensor([[1, 2, 3, 4]])
    logits = one_hot_logits([1, 2, 3, 9]).view(1, 4, 256)
    per_position = [distance_weighted_cross_entropy(logits[:, i : i + 1], targets[:, i : i + 1]) for i in range(4)]
    total = distance_weighted_cross_entropy(logits, targets)
    assert total.item() == pytest.approx(sum(p.item() for p in per_position) / 4, rel=1e-6)


def test_unknown_weighting_and_shape_mismatch():
    with pytest.raises(ConfigError, match="task.loss.weighting='cubic' is unknown; choose one of: linear"):
        distance_weighted_cross_entropy(torch.zeros(1, 256), torch.zeros(1, dtype=torch.long), weighting="cubic")
    with pytest.raises(ValueError, match="do not match"):
        distance_weighted_cross_entropy(torch.zeros(2, 256), torch.zeros(3, dtype=torch.long))


def test_next_token_cross_entropy_uniform():
    logits = torch.zeros(2, 5, 64)
    assert next_token_cross_entropy(logits, torch.zeros(2, 5, dtype=torch.long)).item() == pytest.approx(math.log(64))
