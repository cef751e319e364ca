"""``tiny_decoder.analysis.arms``: the statistics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from tiny_decoder.analysis.arms import (
    BASELINE_LABEL,
    BETTER,
    FEW_PAIRS,
    NO_INTERVAL,
    UNPAIRED,
    WITHIN_NOISE,
    WORSE,
    duplicate_seeds,
    find_arm,
    group_arms,
    paired_difference,
    parse_arm,
    summarise,
    t_quantile,
    verdict,
)

# t(0.975, df=2) in closed form: for 2 degrees of freedom t_p = (2p - 1) * sqrt(2 / (4 p (1 - p))), so
# t = 0.95 * sqrt(2 / 0.0975) = 4.30265272974946 (tables that print 4.302652729911275 are off in the 10th digit)
T2 = 0.95 * math.sqrt(2 / 0.0975)
T1 = 12.706204736174694  # t(0.975, df=1) = tan(0.475 pi)

BASELINE = {0: 2.0, 1: 2.2, 2: 2.1}
ARM = {0: 1.8, 1: 2.1, 2: 1.9}


def test_t_quantile_is_scipy_student_t() -> None:
    assert t_quantile(2) == pytest.approx(T2, rel=1e-12)
    assert t_quantile(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12) == pytest.approx(T1)
    for df in (1, 2, 5, 30):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12)


def test_summary_of_three_seeds() -> None:
    summary = summarise(BASELINE.values())
    # mean (2.0 + 2.2 + 2.1) / 3 = 2.1; deviations -0.1, 0.1, 0; sd = sqrt((0.01 + 0.01 + 0) / 2) = 0.1
    # half-width t * sd / sqrt(3) = 4.30265 * 0.1 / 1.73205 = 0.248414; CI [1.851586, 2.348414]
    half = T2 * 0.1 / math.sqrt(3)
    assert half == pytest.approx(0.2484137711750, rel=1e-9)
    assert summary.n == 3 and summary.n_failed == 0 and summary.n_missing == 0
    assert summary.mean == pytest.approx(2.1)
    assert summary.sd == pytest.approx(0.1)
    assert summary.ci_low == pytest.approx(2.1 - half) and summary.ci_high == pytest.approx(2.1 + half)
    assert (summary.min, summary.max) == (2.0, 2.2)
    assert summary.has_interval and summary.note == "" and summary.n_text == "3"

    arm = summarise(ARM.values())
    # mean 5.8 / 3 = 1.933333; deviations -0.133333, 0.166667, -0.033333; squares 0.017778 + 0.027778 +
    # 0.001111 = 0.046667; sd = sqrt(0.046667 / 2) = sqrt(0.023333) = 0.152753
    sd = math.sqrt(0.07 / 3)
    assert arm.mean == pytest.approx(5.8 / 3) and arm.sd == pytest.approx(sd) == pytest.approx(0.1527525)
    assert arm.ci_low == pytest.approx(5.8 / 3 - T2 * sd / math.sqrt(3))
    assert arm.ci_high == pytest.approx(2.3127916, abs=1e-7)


def test_summary_of_one_seed_has_no_interval() -> None:
    summary = summarise([2.05])
    assert summary.n == 1 and summary.mean == 2.05 and summary.min == summary.max == 2.05
    assert math.isnan(summary.sd) and math.isnan(summary.ci_low) and math.isnan(summary.ci_high)
    assert not summary.has_interval and summary.note == NO_INTERVAL == "n=1: no interval"


def test_summary_counts_failed_and_missing() -> None:
    summary = summarise([2.5, float("nan"), 2.7], n_failed=1)
    # two values: mean 2.6, sd sqrt((0.01 + 0.01) / 1) = 0.141421; half-width 12.7062 * 0.141421 / sqrt(2) = 1.27062
    assert summary.n == 2 and summary.n_failed == 1 and summary.n_missing == 1
    assert summary.mean == pytest.approx(2.6) and summary.sd == pytest.approx(math.sqrt(0.02))
    assert summary.ci_low == pytest.approx(2.6 - T1 * 0.1) and summary.ci_high == pytest.approx(2.6 + T1 * 0.1)
    assert summary.n_text == "2 (1 failed, 1 missing)"
    empty = summarise([], n_failed=3)
    assert empty.n == 0 and math.isnan(empty.mean) and empty.note == "no value" and empty.n_text == "0 (3 failed)"


def test_paired_difference_by_hand() -> None:
    paired = paired_difference(ARM, BASELINE, "min")
    # per seed arm - baseline: -0.2, -0.1, -0.2; mean -0.5 / 3 = -0.166667
    # deviations -0.033333, 0.066667, -0.033333; sd = sqrt((0.001111 + 0.004444 + 0.001111) / 2) = sqrt(0.003333)
    # = 0.057735; half-width 4.30265 * 0.057735 / 1.73205 = 0.143422; CI [-0.310088, -0.023245]: below 0
    sd = math.sqrt(0.01 / 3)
    half = T2 * sd / math.sqrt(3)
    assert paired.n_pairs == 3 and paired.seeds == ("0", "1", "2")
    assert paired.mean_diff == pytest.approx(-0.5 / 3) and paired.sd_diff == pytest.approx(sd)
    assert paired.ci_low == pytest.approx(-0.5 / 3 - half) == pytest.approx(-0.3100884, abs=1e-7)
    assert paired.ci_high == pytest.approx(-0.5 / 3 + half) == pytest.approx(-0.0232449, abs=1e-7)
    assert paired.verdict == BETTER  # lower loss
    # the unpaired intervals overlap ([1.554, 2.313] vs [1.852, 2.348]): pairing by seed is what shows it
    assert summarise(ARM.values()).ci_high > summarise(BASELINE.values()).ci_low


def test_mode_max_flips_the_verdict() -> None:
    assert paired_difference(ARM, BASELINE, "max").verdict == WORSE
    assert paired_difference(BASELINE, ARM, "min").verdict == WORSE
    assert paired_difference(BASELINE, ARM, "max").verdict == BETTER
    assert verdict(-0.1, 0.3, "min") == verdict(-0.1, 0.3, "max") == WITHIN_NOISE
    assert verdict(0.0, 0.3, "min") == WITHIN_NOISE  # the CI touches 0
    with pytest.raises(ValueError, match="mode must be one of"):
        verdict(1.0, 2.0, "up")


def test_within_noise() -> None:
    # diffs 0.5, -0.5 (seeds 0, 1): mean 0, CI [-6.35, 6.35] contains 0
    paired = paired_difference({0: 2.5, 1: 1.7}, {0: 2.0, 1: 2.2}, "min")
    assert paired.n_pairs == 2 and paired.mean_diff == pytest.approx(0.0, abs=1e-12)
    assert paired.sd_diff == pytest.approx(math.sqrt(0.5))
    assert paired.ci_high == pytest.approx(T1 * math.sqrt(0.5) / math.sqrt(2)) == pytest.approx(6.353102, abs=1e-6)
    assert paired.verdict == WITHIN_NOISE


def test_pairs_only_common_finite_seeds() -> None:
    # seed 1 failed in the arm (NaN), seed 3 only in the arm: pairs on 0 and 2, diffs -0.2 and -0.2
    paired = paired_difference({0: 1.8, 1: float("nan"), 2: 1.9, 3: 1.0}, BASELINE, "min")
    assert paired.seeds == ("0", "2") and paired.n_pairs == 2
    assert paired.mean_diff == pytest.approx(-0.2) and paired.sd_diff == pytest.approx(0.0, abs=1e-12)
    assert paired.verdict == BETTER  # a zero-width interval below 0
    one = paired_difference({0: 2.05}, BASELINE, "min")
    assert one.n_pairs == 1 and one.mean_diff == pytest.approx(0.05) and math.isnan(one.ci_low)
    assert one.verdict == FEW_PAIRS == "n/a (n<2 pairs)"


def test_unpaired_arms() -> None:
    paired = paired_difference({3: 1.0, 4: 1.1, 5: 1.2}, BASELINE, "min")
    assert paired.verdict == UNPAIRED == "unpaired" and paired.n_pairs == 0 and paired.seeds == ()
    assert math.isnan(paired.mean_diff) and math.isnan(paired.ci_low) and math.isnan(paired.ci_high)


def test_seeds_as_strings_and_ints_pair() -> None:
    assert paired_difference({"0": 1.0, "01": 2.0}, {0: 0.5, 1: 1.0}, "min").seeds == ("0", "1")
    assert duplicate_seeds({"a": "0", "b": 0, "c": "1"}) == {"0": ["a", "b"]}


def test_group_arms_drops_the_seed_and_shared_overrides() -> None:
    jobs = {
        "0": {"experiment": "x", "seed": "0"},
        "1": {"experiment": "x", "seed": "1"},
        "2": {"experiment": "x", "attention": "linformer", "seed": "0"},
        "3": {"experiment": "x", "attention": "linformer", "seed": "1"},
        "4": {"experiment": "x", "attention": "linformer", "attention.k": "4", "seed": "0"},
        "5": {"experiment": "x", "norm": "post"},
    }
    assert group_arms(jobs) == {
        BASELINE_LABEL: ["0", "1"],
        "attention=linformer": ["2", "3"],
        "attention=linformer attention.k=4": ["4"],
        "norm=post": ["5"],
    }
    assert BASELINE_LABEL == "(default)"
    assert group_arms({"0": {"seed": "0"}, "1": {"seed": "1"}}) == {BASELINE_LABEL: ["0", "1"]}  # seeds only
    grid = {"0": {"a": "x", "b": "u"}, "1": {"a": "x", "b": "v"}}
    assert list(group_arms(grid)) == ["b=u", "b=v"]  # a is shared: not in the labels


def test_parse_and_find_arm() -> None:
    assert parse_arm("attention=linformer +norm=post") == {"attention": "linformer", "norm": "post"}
    assert parse_arm("") == parse_arm(BASELINE_LABEL) == {}
    with pytest.raises(ValueError, match="'attention' is not key=value"):
        parse_arm("attention")
    arms = {
        BASELINE_LABEL: {"experiment": "x"},
        "attention=linformer": {"experiment": "x", "attention": "linformer"},
        "attention=linformer norm=post": {"experiment": "x", "attention": "linformer", "norm": "post"},
    }
    assert find_arm(arms, {"attention": "linformer"}) == "attention=linformer"
    assert find_arm(arms, {"experiment": "x", "attention": "linformer"}) == "attention=linformer"  # shared too
    assert find_arm(arms, {"norm": "post", "attention": "linformer"}) == "attention=linformer norm=post"
    assert find_arm(arms, {}) == BASELINE_LABEL
    assert find_arm(arms, {"attention": "sdpa"}) is None and find_arm(arms, {"norm": "post"}) is None
