"""Seed-replicated comparisons: jobs that differ only in their seed form one **arm**; arms are summarised and
compared with a baseline arm seed by seed. Pure statistics: no files, no plots (``tiny_decoder.report`` reads the
jobs and draws).

- ``group_arms(overrides_by_job)``: arm label -> its jobs. The label is the job's swept overrides apart from the
  seed (``attention=linformer norm=post``), ``(default)`` for the jobs that set no swept override.
- ``summarise(values)``: n, mean, standard deviation (ddof 1), a 95% Student-t interval
  ``mean ± t(0.975, n-1) · sd / √n`` (NaN for n < 2: no interval), min, max.
- ``paired_difference(arm_by_seed, baseline_by_seed, mode)``: the per-seed differences arm − baseline on the
  seeds both arms finished (the same seed gives the same data order and initialisation where the arms allow
  it), their mean and 95% interval, and a verdict: ``better`` / ``worse`` when the interval excludes 0 on the
  good / bad side for the mode (``min``: lower is better), ``within noise`` when it contains 0,
  ``n/a (n<2 pairs)`` with one common seed and ``unpaired`` with none.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy.special import stdtrit  # the kernel of scipy.stats.t.ppf, at half the import time

NAN = float("nan")
CONFIDENCE = 0.95
SEED_KEY = "seed"
BASELINE_LABEL = "(default)"  # the arm that sets no swept override
BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"
FEW_PAIRS, UNPAIRED, DUPLICATE_SEEDS = "n/a (n<2 pairs)", "unpaired", "n/a (duplicate seeds)"
NO_INTERVAL = "n=1: no interval"
MODES = ("min", "max")


# --------------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------------


def swept_keys(overrides_by_job: Mapping[str, Mapping[str, str]], seed_key: str | None = SEED_KEY) -> list[str]:
    """Override keys other than ``seed_key`` (None: any key) whose value differs between jobs (absent counts as a
    value), in first-seen order."""
    keys = list(dict.fromkeys(key for overrides in overrides_by_job.values() for key in overrides))
    values = overrides_by_job.values()
    return [key for key in keys if key != seed_key and len({overrides.get(key) for overrides in values}) > 1]


def arm_label(overrides: Mapping[str, str], swept: Sequence[str]) -> str:
    """``attention=linformer norm=post`` (the swept overrides the job sets, in ``swept`` order), or
    ``(default)`` when it sets none."""
    return " ".join(f"{key}={overrides[key]}" for key in swept if key in overrides) or BASELINE_LABEL


def group_arms(jobs_overrides: Mapping[str, Mapping[str, str]], seed_key: str = SEED_KEY) -> dict[str, list[str]]:
    """Arm label -> the names of its jobs (in the mapping's order): jobs whose overrides differ only in
    ``seed_key`` share an arm."""
    swept = swept_keys(jobs_overrides, seed_key)
    arms: dict[str, list[str]] = {}
    for job, overrides in jobs_overrides.items():
        arms.setdefault(arm_label(overrides, swept), []).append(job)
    return arms


def parse_arm(text: str) -> dict[str, str]:
    """``"attention=linformer +norm=post"`` -> ``{"attention": "linformer", "norm": "post"}`` (Hydra's
    ``+``/``++``/``~`` prefixes dropped, as in the labels); ``(default)`` or an empty text -> ``{}``."""
    if text.strip() in ("", BASELINE_LABEL):
        return {}
    pairs: dict[str, str] = {}
    for item in shlex.split(text):
        key, equals, value = item.partition("=")
        if not equals or not key.lstrip("+~"):
            raise ValueError(f"{item!r} is not key=value")
        pairs[key.lstrip("+~")] = value
    return pairs


def find_arm(arms: Mapping[str, Mapping[str, str]], wanted: Mapping[str, str], seed_key: str = SEED_KEY) -> str | None:
    """The arm ``wanted`` (``parse_arm``) names: the one whose swept overrides are all in ``wanted`` and whose
    overrides hold all of ``wanted`` (so overrides shared by every job may be given too). ``arms``: label -> the
    overrides of one of its jobs. None when no arm, or more than one, matches."""
    swept = swept_keys(arms, seed_key)
    matches = []
    for label, overrides in arms.items():
        own = {key: overrides[key] for key in swept if key in overrides}
        if all(wanted.get(k) == v for k, v in own.items()) and all(overrides.get(k) == v for k, v in wanted.items()):
            matches.append(label)
    return matches[0] if len(matches) == 1 else None


def seed_key_of(value: object) -> str:
    """A seed as a pairing key: ``0``, ``"0"`` and ``"00"`` are the same seed."""
    text = str(value).strip()
    try:
        return str(int(text))
    except ValueError:
        return text


def duplicate_seeds(seeds_by_job: Mapping[str, object]) -> dict[str, list[str]]:
    """Seed -> the jobs that share it, for the seeds that more than one job of an arm has."""
    jobs_by_seed: dict[str, list[str]] = {}
    for job, seed in seeds_by_job.items():
        jobs_by_seed.setdefault(seed_key_of(seed), []).append(job)
    return {seed: jobs for seed, jobs in jobs_by_seed.items() if len(jobs) > 1}


# --------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t critical value: ``t.ppf((1 + confidence) / 2, df)``; 4.3027 for df=2."""
    return float(stdtrit(df, (1.0 + confidence) / 2.0))


def finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


@dataclass(frozen=True)
class Summary:
    """One arm's values of one metric. ``n``: the finished jobs that have a finite value; ``n_failed``: its
    failed jobs; ``n_missing``: finished jobs without the metric (or with a non-finite value). ``sd``, ``ci_low``
    and ``ci_high`` are NaN for n < 2 (no interval); everything is NaN for n = 0."""

    n: int
    n_failed: int
    n_missing: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    min: float
    max: float

    @property
    def has_interval(self) -> bool:
        return self.n >= 2

    @property
    def note(self) -> str:
        """Why there is no interval (``n=1: no interval``, ``no value``); empty when there is one."""
        return interval_note(self.n)

    @property
    def n_text(self) -> str:
        """``3``, ``2 (1 failed)``, ``2 (1 failed, 1 missing)``."""
        return count_text(self.n, self.n_failed, self.n_missing)


def interval_note(n: int) -> str:
    """Why a sample of ``n`` values has no interval: ``n=1: no interval``, ``no value``; empty for n >= 2."""
    return "" if n >= 2 else (NO_INTERVAL if n == 1 else "no value")


def count_text(n: int, n_failed: int = 0, n_missing: int = 0) -> str:
    """``3``, ``2 (1 failed)``, ``2 (1 failed, 1 missing)``."""
    extra = [f"{count} {what}" for count, what in ((n_failed, "failed"), (n_missing, "missing")) if count]
    return f"{n} ({', '.join(extra)})" if extra else str(n)


def mean_and_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sd with ddof 1, ci_low, ci_high) of finite values; NaN where undefined."""
    n = len(values)
    if n == 0:
        return NAN, NAN, NAN, NAN
    mean = math.fsum(values) / n
    if n < 2:
        return mean, NAN, NAN, NAN
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def summarise(values: Iterable[float], n_failed: int = 0) -> Summary:
    """The summary of one arm: ``values`` of its finished jobs (NaN / None: the metric is missing),
    ``n_failed`` its failed jobs."""
    given = list(values)
    kept = finite(given)
    mean, sd, low, high = mean_and_interval(kept)
    return Summary(
        n=len(kept),
        n_failed=n_failed,
        n_missing=len(given) - len(kept),
        mean=mean,
        sd=sd,
        ci_low=low,
        ci_high=high,
        min=min(kept, default=NAN),
        max=max(kept, default=NAN),
    )


@dataclass(frozen=True)
class Paired:
    """The per-seed difference arm − baseline on their common seeds (``seeds``, sorted): mean, sd (ddof 1),
    95% interval and verdict. ``mean_diff`` is NaN when unpaired; the interval is NaN with fewer than 2 pairs."""

    n_pairs: int
    seeds: tuple[str, ...]
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    verdict: str

    @classmethod
    def not_available(cls, verdict: str) -> Paired:
        return cls(0, (), NAN, NAN, NAN, NAN, verdict)


def verdict(ci_low: float, ci_high: float, mode: str) -> str:
    """``better`` / ``worse`` when the interval of arm − baseline excludes 0 on the good / bad side of the mode
    (``min``: lower is better), else ``within noise``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if ci_low <= 0.0 <= ci_high:
        return WITHIN_NOISE
    lower = ci_high < 0.0
    return BETTER if lower == (mode == "min") else WORSE


def seed_sort_key(seed: str) -> tuple[int, int | str]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


def paired_difference(
    arm_values_by_seed: Mapping[Any, float], baseline_values_by_seed: Mapping[Any, float], mode: str
) -> Paired:
    """arm − baseline seed by seed on the seeds where both have a finite value."""
    arm = {seed_key_of(seed): value for seed, value in arm_values_by_seed.items() if finite([value])}
    base = {seed_key_of(seed): value for seed, value in baseline_values_by_seed.items() if finite([value])}
    seeds = tuple(sorted(set(arm) & set(base), key=seed_sort_key))
    if not seeds:
        return Paired.not_available(UNPAIRED)
    diffs = [float(arm[seed]) - float(base[seed]) for seed in seeds]
    mean, sd, low, high = mean_and_interval(diffs)
    outcome = verdict(low, high, mode) if len(seeds) >= 2 else FEW_PAIRS
    return Paired(len(seeds), seeds, mean, sd, low, high, outcome)
