"""Independent checks of the sequence families' rules, from the values alone (not from the generator code):
each ``RULE_CHECKS[name](values)`` raises AssertionError when the values break the family's rule. Shared by
the tests of the families (test_sequence_families.py) and of the batches and data module (test_sequences.py).
"""

from fractions import Fraction

EXPECTED_PHASE_FAMILIES = {
    1: {"constant", "arithmetic", "alternating"},
    2: {
        "alternating_steps",
        "growing_steps",
        "shrinking_steps",
        "geometric",
        "alternating_factors",
        "rational_factors",
        "two_step",
        "three_step",
        "mixed_periods",
    },
    3: {
        "fibonacci_mod",
        "double_every_third",
        "floor_geometric",
        "ceil_geometric",
        "alternating_signs",
        "parity_rule",
        "threshold_switch",
    },
}


def differences(x):
    return [b - a for a, b in zip(x, x[1:], strict=False)]


def assert_arithmetic(x):
    """Constant non-zero step (a single term has no step to check)."""
    steps = set(differences(x))
    assert len(steps) <= 1, f"not arithmetic: {x}"
    assert 0 not in steps, f"zero step: {x}"


def check_constant(x):
    assert len(set(x)) == 1


def check_arithmetic(x):
    assert_arithmetic(x)


def check_alternating(x):
    assert x[0] != x[1]
    assert all(x[i] == x[i - 2] for i in range(2, len(x)))


def check_alternating_steps(x):
    d = differences(x)
    assert d[0] != d[1] and 0 not in d[:2]
    assert all(d[i] == d[i - 2] for i in range(2, len(d)))


def check_growing_steps(x):
    second = set(differences(differences(x)))
    assert len(second) == 1 and second.pop() >= 1


def check_shrinking_steps(x):
    second = set(differences(differences(x)))
    assert len(second) == 1 and second.pop() <= -1


def obeys_factors_mod_256(x, factors):
    return all(x[i + 1] == factors[i % len(factors)] * x[i] % 256 for i in range(len(x) - 1))


def check_geometric(x):
    assert x[0] != 0
    assert any(obeys_factors_mod_256(x, (ratio,)) for ratio in (2, 3, 4))


def check_alternating_factors(x):
    assert x[0] != 0
    assert obeys_factors_mod_256(x, (2, 3)) or obeys_factors_mod_256(x, (3, 2))


def check_rational_factors(x):
    def obeys(first, second):
        operations = (first, second)
        return all(x[i + 1] == operations[i % 2](x[i]) for i in range(len(x) - 1))

    def halve(v):
        return v // 2

    def three_halves(v):
        return 3 * v // 2

    assert 0 not in x
    assert obeys(halve, three_halves) or obeys(three_halves, halve)


def check_blocks(x, size):
    blocks = [x[i : i + size] for i in range(0, len(x), size)]
    assert all(len(set(block)) == 1 for block in blocks), f"blocks not constant: {x}"
    assert_arithmetic([block[0] for block in blocks])


def check_two_step(x):
    check_blocks(x, 2)


def check_three_step(x):
    check_blocks(x, 3)


def check_mixed_periods(x):
    d = differences(x)
    assert d[0] != 0
    assert d == [0 if i % 3 == 1 else d[0] for i in range(len(d))]


def check_fibonacci_mod(x):
    assert any(x), "all-zero sequence"

    def obeys(m):
        return max(x) < m and all(x[i] == (x[i - 1] + x[i - 2]) % m for i in range(2, len(x)))

    assert any(obeys(m) for m in range(2, 11))


def check_double_every_third(x):
    assert all(x[i] % 2 == 0 for i in range(2, len(x), 3))
    assert_arithmetic([v // 2 if i % 3 == 2 else v for i, v in enumerate(x)])


NON_INTEGER_RATIOS = [Fraction(p, q) for p in range(2, 7) for q in range(2, 7) if p > q and p % q]


def check_rounded_geometric(x, rounding):
    def obeys(ratio):
        return all(x[i] == rounding(x[0] * ratio**i) for i in range(len(x)))

    assert x[0] >= 1
    assert any(obeys(ratio) for ratio in NON_INTEGER_RATIOS)


def check_floor_geometric(x):
    check_rounded_geometric(x, lambda value: value.numerator // value.denominator)


def check_ceil_geometric(x):
    check_rounded_geometric(x, lambda value: -(-value.numerator // value.denominator))


def check_alternating_signs(x):
    signed = [v - 128 for v in x]
    assert all((v > 0) if i % 2 == 0 else (v < 0) for i, v in enumerate(signed))
    assert_arithmetic([abs(v) for v in signed])


def check_parity_rule(x):
    increments = {b - a for a, b in zip(x, x[1:], strict=False) if a % 2 == 0}
    assert len(increments) == 1, f"no single increment: {x}"
    increment = increments.pop()
    assert increment >= 1
    assert all(b == 2 * a for a, b in zip(x, x[1:], strict=False) if a % 2 == 1)


def check_threshold_switch(x):
    pairs = list(zip(x, x[1:], strict=False))
    rises = {b - a for a, b in pairs if b > a}
    falls = {a - b for a, b in pairs if b < a}
    assert len(rises) == 1 and len(falls) == 1, f"needs one rise and one fall size: {x}"
    assert all(a != b for a, b in pairs)
    # A threshold T exists iff every value followed by a rise is below every value followed by a fall.
    assert max(a for a, b in pairs if b > a) < min(a for a, b in pairs if b < a)


RULE_CHECKS = {
    "constant": check_constant,
    "arithmetic": check_arithmetic,
    "alternating": check_alternating,
    "alternating_steps": check_alternating_steps,
    "growing_steps": check_growing_steps,
    "shrinking_steps": check_shrinking_steps,
    "geometric": check_geometric,
    "alternating_factors": check_alternating_factors,
    "rational_factors": check_rational_factors,
    "two_step": check_two_step,
    "three_step": check_three_step,
    "mixed_periods": check_mixed_periods,
    "fibonacci_mod": check_fibonacci_mod,
    "double_every_third": check_double_every_third,
    "floor_geometric": check_floor_geometric,
    "ceil_geometric": check_ceil_geometric,
    "alternating_signs": check_alternating_signs,
    "parity_rule": check_parity_rule,
    "threshold_switch": check_threshold_switch,
}
