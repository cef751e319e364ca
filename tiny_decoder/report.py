"""``python -m tiny_decoder.report MULTIRUN_DIR [--metric val/loss] [--mode min|max] [--out DIR] [--baseline "k=v"]``.

Summarises a Hydra multirun: every directory under ``MULTIRUN_DIR`` holding ``.hydra/overrides.yaml`` is a
job. A job with a ``results.json`` (written by ``tiny_decoder.train``) contributes its val/test metrics,
parameter count and wall time; one without is FAILED (with the last error line of its ``error.txt`` /
``*.log`` when there is one). Writes to ``--out`` (default: the multirun directory):

- ``results.md`` (also printed): one row per job, the swept overrides as columns (overrides shared by every
  job are listed above the table), the metrics (``--metric``, default ``val/loss``, plus every ``test/*``
  metric that exists), parameters and wall time, sorted by the first metric (failed / missing last);
- ``results.csv``: the same rows, full precision, plus the status and error;
- ``results.png``: one bar panel per swept key (config group or field): the first metric per option, the
  mean when several jobs share the option (their values as dots), annotated with parameters and wall
  time. A panel holds the jobs that set its key and the baseline jobs that set no swept key ("(default)"),
  so a one-at-a-time ablation over several groups gives one panel per group against the baseline;
- ``arms.md`` (also printed when an arm has several jobs) and ``arms.csv`` (full precision): jobs whose
  overrides differ only in ``seed`` form one **arm** (labelled by its swept overrides, ``(default)`` for the
  one that sets none). Per metric (the ``--metric`` ones and the ``test/`` twin of each ``val/`` one) and arm:
  n (failed jobs said so), mean, sd, a 95% Student-t interval (``n=1: no interval``), min, max, and against
  the baseline arm (``--baseline "k=v ..."``, default the ``(default)`` arm; none: no paired columns, and the
  table says why) the per-seed paired difference arm - baseline on the seeds both finished, its mean and
  95% interval, and a verdict: better / worse / within noise (the interval contains 0) / unpaired (no
  common seed) / n/a (n<2 pairs). Lower or higher is better per the metric's mode: ``--mode`` for the first
  metric, the checkpoint callback's for the metric it monitors, else max for accuracy-like names, min for
  the rest. A job's seed is its ``seed=`` override, else its ``.hydra/config.yaml``'s; two jobs of an arm
  with one seed are flagged. The statistics are ``tiny_decoder.analysis.arms``;
- ``arms.png``: one panel per metric of the arm table: each seed as a dot, the mean with its 95% interval
  as an error bar, the baseline's mean as a dashed line, n and the verdict above;
- ``curves.png`` when jobs have ``csv/metrics.csv``: the metric (and its ``train/`` counterpart) over steps,
  one line per job, or, when an arm has several seeds, the mean over seeds per arm with a min-max band.

For the metric the checkpoint callback monitors, the value is the best one (``best_score``, what
``train()`` returns to a sweeper), not the last validation's; its mode then also sets the sort order.
A study's directory (``python -m tiny_decoder.train study=NAME``: its ``study.yaml``) names the arms after the
study's arms (jobs ``<arm>/seed<k>``) and sets the default metrics, mode and baseline arm.
Callers (a study runner): ``build_report(root, metrics, out, mode, baseline)`` writes all of this and returns
the ``Report`` (``files``, ``arms``: the arm rows); ``arm_table(root, metrics, mode, baseline)`` returns the
arm rows alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tiny_decoder.analysis.arms import (
    BASELINE_LABEL,
    DUPLICATE_SEEDS,
    SEED_KEY,
    UNPAIRED,
    Paired,
    count_text,
    duplicate_seeds,
    find_arm,
    group_arms,
    interval_note,
    paired_difference,
    parse_arm,
    seed_key_of,
    seed_sort_key,
    summarise,
)
from tiny_decoder.analysis.arms import swept_keys as differing_keys
from tiny_decoder.cli import run_cli
from tiny_decoder.run import run_dir
from tiny_decoder.run.run_dir import RunDir, find_runs, read_logged_rows
from tiny_decoder.run.study import read_manifest

DEFAULT_METRIC = "val/loss"
DEFAULT_VALUE = "(default)"
ERROR_FILES = (run_dir.ERROR, run_dir.LOG)
MAX_ERROR = 160
ANNOTATION = {"ha": "center", "va": "bottom", "fontsize": 7}
NAN = float("nan")
HIGHER_IS_BETTER = re.compile(r"(^|_)(acc|accuracy|f1|bleu|exact_match)($|_)|_per_sec$")  # scores, throughput


# --------------------------------------------------------------------------------------------------------
# Reading jobs
# --------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One multirun job directory."""

    name: str
    path: Path
    overrides: dict[str, str]
    raw_overrides: list[str] = field(default_factory=list)
    results: dict[str, Any] | None = None
    error: str = ""
    monitor: tuple[str, str] | None = None  # (metric, mode) of the checkpoint callback
    metrics: dict[str, float] = field(default_factory=dict)
    seed: str | None = None  # its seed= override, else the composed config's seed

    @property
    def failed(self) -> bool:
        return self.results is None

    def value(self, metric: str) -> float:
        return self.metrics.get(metric, NAN)


def find_job_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    jobs = [run.path for run in find_runs(root)]
    if not jobs:
        raise ValueError(
            f"{root} is not a multirun directory: no job directory with .hydra/overrides.yaml under it "
            "(expected e.g. multirun/<task>/<date>/<time>/ holding 0/, 1/, ...)"
        )
    return jobs


def parse_override(text: str) -> tuple[str, str]:
    """``+experiment=x`` -> ``("experiment", "x")``; ``~callbacks.samples`` -> ``("callbacks.samples", "(deleted)")``.

    Hydra's ``+``/``++``/``~`` prefixes are dropped from the key (the raw text stays in ``Job.raw_overrides``).
    """
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), value if "=" in str(text) else "(deleted)"


def read_overrides(job_dir: Path) -> list[str]:
    return RunDir(job_dir).read_overrides() or []


def read_error(job_dir: Path) -> str:
    """The last line mentioning an error (else the last line) of ``error.txt``, ``train.log`` or any ``*.log``."""
    candidates = [job_dir / name for name in ERROR_FILES] + sorted(job_dir.glob("*.log"))
    for path in (p for p in candidates if p.is_file()):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
        if errors or lines:
            return (errors or lines)[-1][:MAX_ERROR]
    return ""


def read_monitor(job_dir: Path) -> tuple[str, str] | None:
    return monitor_of(RunDir(job_dir).read_config())


def monitor_of(config: dict[str, Any] | None) -> tuple[str, str] | None:
    if config is None:
        return None
    checkpoint = ((config.get("callbacks") or {}).get("model_checkpoint")) or {}
    return (checkpoint["monitor"], checkpoint.get("mode", "min")) if checkpoint.get("monitor") else None


def flat_metrics(results: dict[str, Any], monitor: tuple[str, str] | None) -> dict[str, float]:
    metrics = {**results.get("train", {}), **results.get("val", {}), **results.get("test", {})}
    if monitor and results.get("best_score") is not None:
        metrics[monitor[0]] = results["best_score"]
    return {key: float(value) for key, value in metrics.items()}


def seed_of(overrides: dict[str, str], config: dict[str, Any] | None) -> str | None:
    """The job's ``seed=`` override, else the ``seed`` of its ``.hydra/config.yaml``; None without either."""
    if SEED_KEY in overrides:
        return seed_key_of(overrides[SEED_KEY])
    seed = (config or {}).get(SEED_KEY)
    return None if seed is None else seed_key_of(seed)


def load_job(job_dir: Path, root: Path) -> Job:
    raw = read_overrides(job_dir)
    name = str(job_dir.relative_to(root)) or "."
    overrides = dict(map(parse_override, raw))
    config = RunDir(job_dir).read_config()
    job = Job(name, job_dir, overrides, raw, monitor=monitor_of(config), seed=seed_of(overrides, config))
    try:
        job.results = RunDir(job_dir).read_results()
    except json.JSONDecodeError:
        job.error = f"unreadable {run_dir.RESULTS}"
    if job.results is None:
        job.error = job.error or read_error(job_dir)
        return job
    job.metrics = flat_metrics(job.results, job.monitor)
    return job


def load_jobs(root: Path) -> list[Job]:
    return [load_job(job_dir, root) for job_dir in find_job_dirs(root)]


# --------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------


def swept_keys(jobs: Sequence[Job]) -> list[str]:
    """Override keys (the seed too) whose value differs between jobs (absent counts as a value), in first-seen
    order."""
    return differing_keys({job.name: job.overrides for job in jobs}, seed_key=None)


def common_overrides(jobs: Sequence[Job], swept: Sequence[str]) -> list[str]:
    return [raw for raw in jobs[0].raw_overrides if parse_override(raw)[0] not in swept]


def metric_columns(jobs: Sequence[Job], metrics: Sequence[str]) -> list[str]:
    tests = sorted({key for job in jobs for key in job.metrics if key.startswith("test/")})
    return list(dict.fromkeys([*metrics, *tests]))


def sort_mode(jobs: Sequence[Job], metric: str, mode: str | None) -> str:
    """``--mode`` if given, else the checkpoint callback's mode when it monitors ``metric``, else min."""
    monitors = {job.monitor for job in jobs if job.monitor}
    return mode or next((m for name, m in monitors if name == metric), "min")


def sort_jobs(jobs: Sequence[Job], metric: str, mode: str) -> list[Job]:
    sign = -1.0 if mode == "max" else 1.0
    return sorted(jobs, key=lambda job: (math.isnan(job.value(metric)), sign * job.value(metric)))


def status(job: Job) -> str:
    return "FAILED" if job.failed else "ok"


def job_row(job: Job, keys: Sequence[str], metrics: Sequence[str]) -> dict[str, Any]:
    results = job.results or {}
    return {
        "job": job.name,
        **{key: job.overrides.get(key, DEFAULT_VALUE) for key in keys},
        "status": status(job),
        **{metric: job.value(metric) for metric in metrics},
        "parameters": results.get("parameters"),
        "wall_time_s": results.get("wall_time_s"),
        "error": job.error,
    }


def format_cell(value: Any, failed: bool) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "failed" if failed else "n/a"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = (format_cell(row[column], row["status"] == "FAILED") for column in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(root: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str], header: Iterable[str]) -> str:
    failures = [f"- job {row['job']}: {row['error'] or 'no results.json'}" for row in rows if row["status"] == "FAILED"]
    parts = [f"# multirun report: {root}", "", *header, "", markdown_table(rows, columns)]
    return "\n".join([*parts, *(["", "Failed jobs:", *failures] if failures else [])]) + "\n"


def csv_cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: csv_cell(value) for key, value in row.items()} for row in rows)
    return path


# --------------------------------------------------------------------------------------------------------
# Arms: the jobs that differ only in their seed
# --------------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    """The jobs whose overrides differ only in ``seed``; ``duplicates``: seed -> jobs, for seeds used twice."""

    label: str
    jobs: list[Job]
    duplicates: dict[str, list[str]] = field(default_factory=dict)

    @property
    def overrides(self) -> dict[str, str]:
        return {key: value for key, value in self.jobs[0].overrides.items() if key != SEED_KEY}

    def values_by_seed(self, metric: str) -> dict[str, float]:
        return {job.seed: job.value(metric) for job in self.jobs if job.seed is not None and not job.failed}


def group_jobs(jobs: Sequence[Job], study_arms: Sequence[str] | None = None) -> list[Arm]:
    """The arms of a multirun, in the order of their first job; in a study (``study_arms``: the arm names of its
    ``study.yaml``, whose jobs are ``<arm>/seed<k>``) the study's arms, by name, in the study's order."""
    names = {job.name: job for job in jobs}
    if study_arms is not None:
        groups = {arm: [job.name for job in jobs if job.name.split("/", 1)[0] == arm] for arm in study_arms}
        groups = {arm: members for arm, members in groups.items() if members}
    else:
        groups = group_arms({job.name: job.overrides for job in jobs})
    arms = [Arm(label, [names[name] for name in members]) for label, members in groups.items()]
    for arm in arms:
        arm.duplicates = duplicate_seeds({job.name: job.seed for job in arm.jobs if job.seed is not None})
    return arms


def choose_baseline(arms: Sequence[Arm], baseline: str | None) -> tuple[Arm | None, str]:
    """The baseline arm and how it was chosen; (None, why) when there is none. ``baseline``: ``--baseline``'s
    ``"k=v k2=v2"``; without it, the arm that sets no swept override."""
    labels = ", ".join(arm.label for arm in arms)
    by_label = {arm.label: arm for arm in arms}
    if baseline is not None and baseline in by_label:  # an arm's label (a study's arm name)
        return by_label[baseline], f"--baseline {baseline}"
    if baseline is not None:
        try:
            found = find_arm({arm.label: arm.overrides for arm in arms}, parse_arm(baseline))
        except ValueError as error:
            raise ValueError(f"--baseline {baseline!r}: {error}; give the overrides of an arm as k=v ...") from None
        if found is None:
            raise ValueError(f"--baseline {baseline!r} matches no arm; the arms: {labels}")
        return by_label[found], f"--baseline {baseline}"
    default = next((arm for arm in arms if arm.label == BASELINE_LABEL), None)
    if default is not None:
        return default, "the arm with no swept override"
    return None, (
        "no paired differences: every arm sets a swept override, so there is no default baseline arm "
        f'(pick one with --baseline "k=v ..."; the arms: {labels})'
    )


def arm_metrics(jobs: Sequence[Job], metrics: Sequence[str]) -> list[str]:
    """The chosen metrics, then the ``test/`` counterpart of each ``val/`` one that some job has."""
    present = {key for job in jobs for key in job.metrics}
    tests = [f"test/{m.split('/', 1)[1]}" for m in metrics if m.startswith("val/")]
    return list(dict.fromkeys([*metrics, *(m for m in tests if m in present)]))


def metric_stem(metric: str) -> str:
    split, _, name = metric.partition("/")
    return name if name and split in ("train", "val", "test") else metric


def metric_mode(jobs: Sequence[Job], metric: str, first: str, mode: str | None) -> str:
    """Whether lower (min) or higher (max) is better: ``--mode`` for the first metric (and its val/test
    counterparts), the checkpoint callback's mode for the metric it monitors (likewise), else max for an
    accuracy-like name (acc, accuracy, f1, bleu, exact_match) or a rate (``*_per_sec``) and min for the rest
    (loss, ppl, mad, bpb)."""
    if mode and metric_stem(metric) == metric_stem(first):
        return mode
    monitors = {job.monitor for job in jobs if job.monitor}
    found = next((m for name, m in sorted(monitors) if metric_stem(name) == metric_stem(metric)), None)
    return found or ("max" if HIGHER_IS_BETTER.search(metric.rsplit("/", 1)[-1]) else "min")


def seeds_text(arm: Arm) -> str:
    done = [job.seed or "?" for job in arm.jobs if not job.failed]
    failed = [job.seed or "?" for job in arm.jobs if job.failed]
    return ", ".join(done) + (f"{'; ' if done else ''}failed: {', '.join(failed)}" if failed else "")


def arm_row(arm: Arm, metric: str, mode: str, baseline: Arm | None, no_baseline: str) -> dict[str, Any]:
    """One arm's summary of one metric and its paired difference with the baseline (CSV columns)."""
    finished = [job for job in arm.jobs if not job.failed]
    summary = summarise([job.value(metric) for job in finished], n_failed=len(arm.jobs) - len(finished))
    if baseline is None:
        paired = Paired.not_available("n/a (no baseline)")
    elif arm is baseline:
        paired = Paired.not_available("baseline")
    elif arm.duplicates or baseline.duplicates:
        paired = Paired.not_available(DUPLICATE_SEEDS)
    else:
        paired = paired_difference(arm.values_by_seed(metric), baseline.values_by_seed(metric), mode)
    notes = [f"seed {seed} used by jobs {', '.join(names)}" for seed, names in arm.duplicates.items()]
    if paired.verdict == UNPAIRED and baseline is not None:
        mine = sorted({s for s, v in arm.values_by_seed(metric).items() if math.isfinite(v)}, key=seed_sort_key)
        theirs = sorted({s for s, v in baseline.values_by_seed(metric).items() if math.isfinite(v)}, key=seed_sort_key)
        notes.append(
            f"no seed in common with the baseline (seeds {' '.join(mine) or '-'} vs {' '.join(theirs) or '-'})"
        )
    return {
        "metric": metric,
        "mode": mode,
        "arm": arm.label,
        "n": summary.n,
        "n_failed": summary.n_failed,
        "n_missing": summary.n_missing,
        "seeds": seeds_text(arm),
        "mean": summary.mean,
        "sd": summary.sd,
        "ci_low": summary.ci_low,
        "ci_high": summary.ci_high,
        "min": summary.min,
        "max": summary.max,
        "baseline": baseline.label if baseline else "",
        "n_pairs": paired.n_pairs,
        "paired_seeds": " ".join(paired.seeds),
        "diff_mean": paired.mean_diff,
        "diff_sd": paired.sd_diff,
        "diff_ci_low": paired.ci_low,
        "diff_ci_high": paired.ci_high,
        "verdict": paired.verdict,
        "note": "; ".join(notes),
        "failed_jobs": " ".join(job.name for job in arm.jobs if job.failed),
    }


@dataclass
class ArmComparison:
    """The arms of a multirun, the baseline (None with ``why``), the metrics with their modes and the rows."""

    arms: list[Arm]
    baseline: Arm | None
    why: str
    modes: dict[str, str]
    rows: list[dict[str, Any]]


def compare_arms(
    jobs: Sequence[Job],
    metrics: Sequence[str] = (DEFAULT_METRIC,),
    mode: str | None = None,
    baseline: str | None = None,
    study_arms: Sequence[str] | None = None,
) -> ArmComparison:
    """Group ``jobs`` into arms (a study's arms by name: ``study_arms``) and summarise every arm for each of
    ``arm_metrics(jobs, metrics)``."""
    arms = group_jobs(jobs, study_arms)
    base, why = choose_baseline(arms, baseline)
    ordered = ([base] if base else []) + [arm for arm in arms if arm is not base]
    modes = {metric: metric_mode(jobs, metric, metrics[0], mode) for metric in arm_metrics(jobs, metrics)}
    rows = [arm_row(arm, metric, modes[metric], base, why) for metric in modes for arm in ordered]
    return ArmComparison(ordered, base, why, modes, rows)


def arm_table(
    root: Path, metrics: Sequence[str] = (DEFAULT_METRIC,), mode: str | None = None, baseline: str | None = None
) -> list[dict[str, Any]]:
    """The rows of ``arms.csv`` for the multirun under ``root`` (one per metric and arm, full precision)."""
    return compare_multirun(Path(root), load_jobs(Path(root)), metrics, mode, baseline)[0].rows


def compare_multirun(
    root: Path, jobs: Sequence[Job], metrics: Sequence[str] | None, mode: str | None, baseline: str | None
) -> tuple[ArmComparison, list[str], str | None]:
    """:func:`compare_arms` of the jobs under ``root``, with the metrics and mode it used; a study's directory
    (``study.yaml``) names the arms and gives the defaults of ``metrics``, ``mode`` and ``baseline``."""
    study = read_manifest(root) or {}
    chosen = list(metrics or study.get("metrics") or [DEFAULT_METRIC])
    mode = mode or study.get("mode")
    study_arms = list(study.get("arms") or []) or None
    comparison = compare_arms(jobs, chosen, mode, baseline or study.get("baseline"), study_arms)
    if baseline is None and study.get("baseline") and comparison.baseline is not None:
        comparison.why = "the study's baseline arm"
    return comparison, chosen, mode


def number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def interval(low: float, high: float) -> str:
    return f"[{number(low)}, {number(high)}]"


def arm_cells(row: dict[str, Any]) -> list[str]:
    paired = row["n_pairs"] >= 1
    cells = [
        row["arm"],
        count_text(row["n"], row["n_failed"], row["n_missing"]),
        row["seeds"],
        number(row["mean"]),
        number(row["sd"]),
        interval(row["ci_low"], row["ci_high"]) if row["n"] >= 2 else interval_note(row["n"]),
        number(row["min"]),
        number(row["max"]),
        number(row["diff_mean"]) if paired else "-",
        interval(row["diff_ci_low"], row["diff_ci_high"]) if row["n_pairs"] >= 2 else "-",
        row["verdict"],
        row["note"],
    ]
    return [str(cell).replace("|", "\\|") for cell in cells]


ARM_COLUMNS = ["arm", "n", "seeds", "mean", "sd", "95% CI", "min", "max", "diff", "diff 95% CI", "verdict", "note"]


def arm_label_of(arm: Arm, common: Sequence[str]) -> str:
    """An arm's own overrides (those not shared by every job), or ``(default)``."""
    shared = {text.lstrip("+~") for text in common}
    own = [f"{key}={value}" for key, value in arm.overrides.items() if f"{key}={value}" not in shared]
    return " ".join(own) or BASELINE_LABEL


def arms_markdown(root: Path, comparison: ArmComparison, common: Sequence[str]) -> str:
    arms, base = comparison.arms, comparison.baseline
    jobs = sum(len(arm.jobs) for arm in arms)
    lines = [
        f"# arms: {root}",
        "",
        f"{jobs} jobs in {len(arms)} arms (an arm: the jobs whose overrides differ only in {SEED_KEY}); "
        "95% CI: mean ± t(0.975, n-1)·sd/√n (Student t), sd with ddof 1.",
        f"baseline: {base.label} ({comparison.why}); diff: arm − baseline, seed by seed on the seeds both "
        "finished, its mean and 95% CI; verdict: better / worse when that CI excludes 0, within noise when "
        "it contains 0."
        if base
        else comparison.why + ".",
        *([f"common overrides: {' '.join(common)}"] if common else []),
    ]
    if any(arm.label != arm_label_of(arm, common) for arm in arms):  # named arms (a study): say what each one is
        lines += ["", "arms:"]
        lines += [f"- {arm.label}: {arm_label_of(arm, common)}" for arm in arms]
    for metric, mode in comparison.modes.items():
        rows = [row for row in comparison.rows if row["metric"] == metric]
        better = "lower" if mode == "min" else "higher"
        columns = ARM_COLUMNS if any(row["note"] for row in rows) else ARM_COLUMNS[:-1]
        lines += ["", f"## {metric} ({mode}: {better} is better)", ""]
        lines += ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(arm_cells(row)[: len(columns)]) + " |" for row in rows]
    failed = [(arm, job) for arm in arms for job in arm.jobs if job.failed]
    if failed:
        lines += ["", "Failed jobs:"]
        lines += [
            f"- job {job.name} (arm {arm.label}, seed {job.seed or '?'}): {job.error or 'no results.json'}"
            for arm, job in failed
        ]
    duplicates = [(arm, seed, names) for arm in arms for seed, names in arm.duplicates.items()]
    if duplicates:
        lines += ["", "Seeds used twice in one arm (not independent replicates; no paired differences for it):"]
        lines += [f"- arm {arm.label}: seed {seed}, jobs {', '.join(names)}" for arm, seed, names in duplicates]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------


def compact(number: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= scale:
            return f"{number / scale:.3g}{suffix}"
    return f"{number:.3g}"


def panel_keys(swept: Sequence[str]) -> list[str]:
    """Swept keys that get their own panel: a field of a swept group (``attention.k`` when ``attention`` is
    swept) is shown inside its group's panel instead."""
    return [key for key in swept if key.split(".", 1)[0] == key or key.split(".", 1)[0] not in swept]


def sets_key(job: Job, key: str) -> bool:
    return any(k == key or k.startswith(key + ".") for k in job.overrides)


def option_label(job: Job, key: str) -> str:
    """The job's option for ``key``, with any of that group's fields it also set: ``linformer (k=4)``."""
    fields = [f"{k.split('.', 1)[1]}={v}" for k, v in job.overrides.items() if k.startswith(key + ".")]
    option = job.overrides.get(key, DEFAULT_VALUE)
    return f"{option} ({', '.join(fields)})" if fields else option


def panel_groups(jobs: Sequence[Job], key: str, swept: Sequence[str]) -> dict[str, list[Job]]:
    """Option -> jobs for one key's panel: the jobs that set ``key`` (or one of its fields), plus baselines
    that set no swept key."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        if sets_key(job, key) or not any(k in job.overrides for k in swept):
            groups.setdefault(option_label(job, key), []).append(job)
    return groups


def _mean(values: Iterable[float | None]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else NAN


def draw_panel(ax: Any, groups: dict[str, list[Job]], metric: str, title: str) -> None:
    options = list(groups)
    heights = [_mean(job.value(metric) for job in groups[option]) for option in options]
    ax.bar(range(len(options)), [0.0 if math.isnan(h) else h for h in heights], color="tab:blue", alpha=0.7)
    finite = [v for members in groups.values() for job in members if not math.isnan(v := job.value(metric))]
    top = max(finite, default=1.0)
    for x, option in enumerate(options):
        members = groups[option]
        values = [job.value(metric) for job in members if not math.isnan(job.value(metric))]
        if len(members) > 1:
            ax.plot([x] * len(values), values, "k.", markersize=4)
        ax.text(x, max([heights[x], *values]) if values else 0.0, annotation(members, values), **ANNOTATION)
    ax.set_xticks(range(len(options)), options, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0 if top >= 0 else None, top * 1.3 if top > 0 else None)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(metric)


def annotation(members: Sequence[Job], values: Sequence[float]) -> str:
    if not values:
        return "failed" if all(job.failed for job in members) else "n/a"
    parameters = _mean((job.results or {}).get("parameters") for job in members)
    wall = _mean((job.results or {}).get("wall_time_s") for job in members)
    failed = sum(job.failed for job in members)
    return f"{compact(parameters)} params\n{wall:.3g} s" + (f"\n{failed} failed" if failed else "")


def save_figure(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    return path


def plot_results(jobs: Sequence[Job], swept: Sequence[str], metric: str, path: Path) -> Path:
    panels = [(key, panel_groups(jobs, key, swept)) for key in panel_keys(swept)]
    panels = panels or [("job", {job.name: [job] for job in jobs})]
    figure = Figure(figsize=(1.5 + 4.0 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, groups) in zip(axes, panels, strict=True):
        draw_panel(ax, groups, metric, key)
    figure.suptitle(f"{metric} per option")
    return save_figure(figure, path)


def draw_arms(ax: Any, comparison: ArmComparison, metric: str) -> None:
    """Per arm: each seed's value as a dot, the mean with its 95% CI as an error bar (none for n=1), the
    baseline's mean as a dashed line; annotated with n and the verdict."""
    rows = [row for row in comparison.rows if row["metric"] == metric]
    for x, (arm, row) in enumerate(zip(comparison.arms, rows, strict=True)):
        values = [v for job in arm.jobs if not job.failed and math.isfinite(v := job.value(metric))]
        offsets = [0.0] if len(values) < 2 else [-0.12 + 0.24 * i / (len(values) - 1) for i in range(len(values))]
        ax.plot([x + o for o in offsets[: len(values)]], values, "k.", markersize=5, alpha=0.6, zorder=3)
        if row["n"] >= 1:
            low, high = (row["ci_low"], row["ci_high"]) if row["n"] >= 2 else (row["mean"], row["mean"])
            error = [[row["mean"] - low], [high - row["mean"]]]
            ax.errorbar([x + 0.25], [row["mean"]], yerr=error, fmt="o", color="tab:blue", capsize=4, zorder=2)
        label = count_text(row["n"], row["n_failed"], row["n_missing"])
        verdict = "" if row["verdict"] == "n/a (no baseline)" else "\n" + row["verdict"]
        top = max(
            [*values, row["ci_high"] if row["n"] >= 2 else NAN],
            key=lambda v: -math.inf if math.isnan(v) else v,
            default=NAN,
        )
        ax.annotate(
            f"n={label}{verdict}",
            (x, 0.0 if math.isnan(top) else top),
            xytext=(0, 4),
            textcoords="offset points",
            **ANNOTATION,
        )
    if comparison.baseline is not None:
        base = next(row for row in rows if row["arm"] == comparison.baseline.label)
        if not math.isnan(base["mean"]):
            ax.axhline(base["mean"], color="gray", linestyle="--", linewidth=1, label=f"baseline mean: {base['arm']}")
            ax.legend(fontsize=7, loc="best")
    ax.set_xticks(
        range(len(comparison.arms)), [arm.label for arm in comparison.arms], rotation=20, ha="right", fontsize=8
    )
    ax.set_xlim(-0.6, len(comparison.arms) - 0.4)
    ax.margins(y=0.15)
    ax.set_title(f"{metric} ({comparison.modes[metric]}): mean ± 95% CI, seeds as dots", fontsize=10)
    ax.set_ylabel(metric)


def plot_arms(comparison: ArmComparison, path: Path) -> Path:
    """One panel per metric of the arm table (two panels a row)."""
    metrics = list(comparison.modes)
    columns = min(2, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    width = 1.5 + max(4.0, 1.1 * len(comparison.arms))
    figure = Figure(figsize=(width * columns, 4.5 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        draw_arms(ax, comparison, metric)
    for ax in axes[len(metrics) :]:
        ax.set_axis_off()
    figure.suptitle("arms (jobs that differ only in the seed)")
    return save_figure(figure, path)


def read_curve(csv_path: Path, metric: str) -> tuple[list[float], list[float]]:
    rows = [row for row in read_logged_rows(csv_path, metric) if "step" in row]
    return [row["step"] for row in rows], [row[metric] for row in rows]


def curve_label(job: Job, swept: Sequence[str]) -> str:
    values = [f"{key}={job.overrides[key]}" for key in swept if key in job.overrides]
    return f"{job.name}: " + (", ".join(values) or DEFAULT_VALUE)


def mean_curve(
    curves: Sequence[tuple[list[float], list[float]]],
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over the seeds' curves, at every step one of them logged (a seed that stopped
    early no longer counts after its last step)."""
    by_step: dict[float, list[float]] = {}
    for steps, values in curves:
        for step, value in zip(steps, values, strict=True):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (
        steps,
        [math.fsum(by_step[s]) / len(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def draw_arm_curves(ax: Any, arms: Sequence[Arm], lines: dict[str, tuple[list[float], list[float]]]) -> None:
    """One line per arm: the mean over its seeds, with a min-max band when it has several."""
    for arm in arms:
        curves = [lines[job.name] for job in arm.jobs if job.name in lines and lines[job.name][0]]
        if not curves:
            continue
        steps, mean, low, high = mean_curve(curves)
        (line,) = ax.plot(steps, mean, marker="." if len(steps) < 30 else None, label=f"{arm.label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_curves(
    jobs: Sequence[Job], swept: Sequence[str], metric: str, path: Path, arms: Sequence[Arm] = ()
) -> Path | None:
    """The metric (and its ``train/`` counterpart) over steps: one line per job, or, when an arm has several
    seeds, one line per arm (the mean over its seeds, a min-max band); None without any CSV log."""
    logged = [(job, RunDir(job.path).metrics_path) for job in jobs if RunDir(job.path).metrics_path.is_file()]
    train_metric = "train/" + metric.split("/", 1)[-1]
    curves = {name: [(job, read_curve(p, name)) for job, p in logged] for name in dict.fromkeys([metric, train_metric])}
    curves = {name: lines for name, lines in curves.items() if any(steps for _, (steps, _) in lines)}
    if not curves:
        return None
    by_arm = any(len(arm.jobs) > 1 for arm in arms)
    figure = Figure(figsize=(1.5 + 5.0 * len(curves), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, lines) in zip(axes, curves.items(), strict=True):
        if by_arm:
            draw_arm_curves(ax, arms, {job.name: curve for job, curve in lines})
        for job, (steps, values) in [] if by_arm else lines:
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=curve_label(job, swept))
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{name} over steps" + (": mean over seeds, min-max band" if by_arm else ""), fontsize=10)
    axes[0].legend(fontsize=7)
    return save_figure(figure, path)


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Rows as written to the CSV (sorted), the table columns and the files written."""

    rows: list[dict[str, Any]]
    columns: list[str]
    markdown: str
    files: dict[str, Path]
    metric: str
    arms: list[dict[str, Any]] = field(default_factory=list)  # arms.csv's rows: one per metric and arm
    arms_markdown: str = ""
    replicated: bool = False  # some arm has several jobs (seeds)


def build_report(
    root: Path,
    metrics: Sequence[str] | None = None,
    out: Path | None = None,
    mode: str | None = None,
    baseline: str | None = None,
) -> Report:
    """Read the multirun under ``root`` and write the report files to ``out`` (default ``root``); ``baseline``:
    the baseline arm as ``"k=v k2=v2"`` or an arm's label (default: the arm with no swept override). A
    ``baseline`` that names no arm is a ValueError, raised before anything is written. A study's directory
    (``study.yaml``, written by the study sweeper) gives the arms their names and the defaults of ``metrics``,
    ``mode`` and ``baseline``."""
    root, out = Path(root), Path(out or root)
    jobs = load_jobs(root)
    comparison, metrics, mode = compare_multirun(root, jobs, metrics, mode, baseline)
    swept = swept_keys(jobs)
    columns_metrics = metric_columns(jobs, metrics)
    order = sort_mode(jobs, metrics[0], mode)
    rows = [job_row(job, swept, columns_metrics) for job in sort_jobs(jobs, metrics[0], order)]
    columns = ["job", *swept, "status", *columns_metrics, "parameters", "wall_time_s"]
    common = common_overrides(jobs, swept)
    header = [f"{len(jobs)} jobs, {sum(j.failed for j in jobs)} failed; sorted by {metrics[0]} ({order})"]
    header += [f"common overrides: {' '.join(common)}"] if common else []
    markdown = markdown_report(root, rows, columns, header)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown)
    files = {"markdown": out / "results.md", "csv": write_csv(rows, out / "results.csv")}
    files["plot"] = plot_results(jobs, swept, metrics[0], out / "results.png")
    arms_md = arms_markdown(root, comparison, common_overrides(jobs, [*swept, SEED_KEY]))
    (out / "arms.md").write_text(arms_md)
    files["arms_markdown"] = out / "arms.md"
    files["arms_csv"] = write_csv(comparison.rows, out / "arms.csv")
    files["arms_plot"] = plot_arms(comparison, out / "arms.png")
    curves = plot_curves(jobs, swept, metrics[0], out / "curves.png", comparison.arms)
    files.update({"curves": curves} if curves else {})
    replicated = any(len(arm.jobs) > 1 for arm in comparison.arms)
    return Report(rows, columns, markdown, files, metrics[0], comparison.rows, arms_md, replicated)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tiny_decoder.report",
        description=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("multirun_dir", type=Path, help="a multirun sweep dir, e.g. multirun/sequence/<date>/<time>")
    parser.add_argument(
        "--metric",
        action="append",
        help=f"metric column (repeatable; the first sorts the rows and is plotted; default {DEFAULT_METRIC}, "
        "or a study's metrics); every test/* metric is added",
    )
    parser.add_argument("--mode", choices=("min", "max"), help="sort order (default: the checkpoint's mode, or min)")
    parser.add_argument("--out", type=Path, help="output directory (default: the multirun dir)")
    parser.add_argument(
        "--baseline",
        metavar='"K=V ..."',
        help='the baseline arm of the paired differences, by its overrides, e.g. "attention=linformer" '
        "(default: the arm with no swept override)",
    )
    return parser.parse_args(argv)


def report(args: argparse.Namespace) -> Report:
    result = build_report(args.multirun_dir, args.metric, args.out, args.mode, args.baseline)
    print(result.markdown)
    if result.replicated:
        print(result.arms_markdown)
    else:
        print("arms.md: every arm has one job (no seed replicates): no intervals\n")
    print("written: " + ", ".join(str(path) for path in result.files.values()))
    if "curves" not in result.files:
        print(f"no curves.png: no job has a csv/metrics.csv logging {result.metric}")
    return result


def main(argv: Sequence[str] | None = None) -> Report:
    return run_cli(report, parse_args(argv))


if __name__ == "__main__":
    main()
