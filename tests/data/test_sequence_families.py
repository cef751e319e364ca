"""Tests for the sequence families and their registry (tiny_decoder.data.sequence_families).

Each family's rule is re-checked from the values alone, independently of the generator code
(tests/data/sequence_rules.py).
"""

import numpy as np
import pytest

from tests.data.sequence_rules import EXPECTED_PHASE_FAMILIES, RULE_CHECKS
from tiny_decoder.data.sequence_families import FAMILIES, FAMILY_NAMES, PHASES, decode_family, families_in_phase

SAMPLES_PER_FAMILY = 200
N_TERMS = 9  # default: 8 inputs + the next number


def test_registry_matches_the_design_card():
    assert PHASES == (1, 2, 3)
    assert list(FAMILIES) == FAMILY_NAMES
    assert set(RULE_CHECKS) == set(FAMILIES)
    for phase in PHASES:
        assert set(families_in_phase(phase)) == EXPECTED_PHASE_FAMILIES[phase]
    for index, name in enumerate(FAMILY_NAMES):
        family = FAMILIES[name]
        assert family.name == name == decode_family(index)
        assert family.rule and "\n" not in family.rule


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_samples_are_in_range_and_obey_the_rule(name):
    rng = np.random.default_rng(123)
    samples = [FAMILIES[name].sample(rng, N_TERMS) for _ in range(SAMPLES_PER_FAMILY)]
    for values in samples:
        assert len(values) == N_TERMS
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in values), values
        RULE_CHECKS[name](values)
    assert len({tuple(values) for values in samples}) > 1, "parameters are not random"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_is_deterministic_given_the_rng(name):
    first = [FAMILIES[name].sample(np.random.default_rng(7), N_TERMS) for _ in range(3)]
    assert first[0] == first[1] == first[2]


@pytest.mark.parametrize("n_terms", [3, 16])
def test_families_work_for_short_and_longest_supported_windows(n_terms):
    rng = np.random.default_rng(0)
    for name, family in FAMILIES.items():
        for _ in range(20):
            values = family.sample(rng, n_terms)
            assert len(values) == n_terms and all(0 <= v <= 255 for v in values)
            RULE_CHECKS[name](values)
