"""Tests for the phase-mix schedule in tiny_decoder.data.curriculum."""

import re

import numpy as np
import pytest
from omegaconf import OmegaConf

from tiny_decoder.data.curriculum import Curriculum

KEYFRAMES = [
    {"epoch": 0, "mix": [1, 0, 0]},
    {"epoch": 10, "mix": [0, 1, 0]},
    {"epoch": 20, "mix": [0, 0, 2]},  # unnormalised on purpose: means [0, 0, 1]
]


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (-3, [1, 0, 0]),  # before the first keyframe: first mix
        (0, [1, 0, 0]),  # at keyframes
        (10, [0, 1, 0]),
        (20, [0, 0, 1]),
        (5, [0.5, 0.5, 0]),  # halfway between keyframes
        (15, [0, 0.5, 0.5]),
        (2.5, [0.75, 0.25, 0]),  # fractional epochs interpolate too
        (100, [0, 0, 1]),  # after the last keyframe: last mix
    ],
)
def test_mix_at_interpolates_linearly_and_holds_outside(epoch, expected):
    np.testing.assert_allclose(Curriculum(KEYFRAMES).mix_at(epoch), expected, atol=1e-12)


def test_mix_is_a_probability_vector_everywhere():
    curriculum = Curriculum(KEYFRAMES)
    for epoch in np.linspace(-5, 30, 71):
        mix = curriculum.mix_at(float(epoch))
        assert mix.shape == (3,)
        assert np.all(mix >= 0)
        assert mix.sum() == pytest.approx(1.0)


def test_weights_are_normalised_before_interpolation():
    curriculum = Curriculum([{"epoch": 0, "mix": [2, 2, 0]}, {"epoch": 4, "mix": [0, 0, 5]}])
    np.testing.assert_allclose(curriculum.mix_at(0), [0.5, 0.5, 0])
    np.testing.assert_allclose(curriculum.mix_at(2), [0.25, 0.25, 0.5])


def test_single_keyframe_is_constant():
    curriculum = Curriculum([{"epoch": 3, "mix": [1, 1, 2]}])
    for epoch in (0, 3, 50):
        np.testing.assert_allclose(curriculum.mix_at(epoch), [0.25, 0.25, 0.5])


def test_linear_default_schedule():
    curriculum = Curriculum.linear(10)
    expected = {
        0: [1, 0, 0],
        5: [0.75, 0.25, 0],
        10: [0.5, 0.5, 0],
        15: [0.35, 0.45, 0.2],
        20: [0.2, 0.4, 0.4],
        40: [0.2, 0.4, 0.4],
    }
    for epoch, mix in expected.items():
        np.testing.assert_allclose(curriculum.mix_at(epoch), mix, atol=1e-12)


def test_linear_custom_final_mix():
    np.testing.assert_allclose(Curriculum.linear(2, final_mix=(0, 0, 1)).mix_at(4), [0, 0, 1])


def test_accepts_omegaconf_containers():
    config = OmegaConf.create({"keyframes": KEYFRAMES})
    curriculum = Curriculum(config.keyframes)
    np.testing.assert_allclose(curriculum.mix_at(15), [0, 0.5, 0.5])


def test_repr_shows_keyframes():
    text = repr(Curriculum([{"epoch": 0, "mix": [1, 0, 0]}, {"epoch": 7, "mix": [1, 1, 2]}]))
    assert text == "Curriculum([{epoch: 0, mix: [1, 0, 0]}, {epoch: 7, mix: [0.25, 0.25, 0.5]}])"


@pytest.mark.parametrize(
    ("keyframes", "field"),
    [
        ([], "keyframes"),
        ({"epoch": 0, "mix": [1, 0, 0]}, "keyframes"),  # a single mapping instead of a list
        ([[0, [1, 0, 0]]], "keyframes[0]"),  # not a mapping
        ([{"epoch": 0}], "keyframes[0]"),  # missing mix
        ([{"epoch": 0, "mix": [1, 0, 0], "mixes": [1]}], "keyframes[0]"),  # unknown key
        ([{"epoch": -1, "mix": [1, 0, 0]}], "keyframes[0].epoch"),
        ([{"epoch": 1.5, "mix": [1, 0, 0]}], "keyframes[0].epoch"),
        ([{"epoch": 0, "mix": [1, 0, 0]}, {"epoch": 0, "mix": [0, 1, 0]}], "keyframes[1].epoch"),
        ([{"epoch": 5, "mix": [1, 0, 0]}, {"epoch": 2, "mix": [0, 1, 0]}], "keyframes[1].epoch"),
        ([{"epoch": 0, "mix": [1, 0]}], "keyframes[0].mix"),
        ([{"epoch": 0, "mix": [1, 0, 0, 0]}], "keyframes[0].mix"),
        ([{"epoch": 0, "mix": [1, -1, 1]}], "keyframes[0].mix"),
        ([{"epoch": 0, "mix": [0, 0, 0]}], "keyframes[0].mix"),
        ([{"epoch": 0, "mix": [1, float("nan"), 0]}], "keyframes[0].mix"),
        ([{"epoch": 0, "mix": "100"}], "keyframes[0].mix"),
    ],
)
def test_invalid_keyframes_name_the_field(keyframes, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        Curriculum(keyframes)


def test_invalid_arguments_name_the_field():
    with pytest.raises(ValueError, match="transition_epochs"):
        Curriculum.linear(0)
    with pytest.raises(ValueError, match="epoch"):
        Curriculum(KEYFRAMES).mix_at(float("nan"))
