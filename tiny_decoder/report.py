"""``python -m tiny_decoder.report MULTIRUN_DIR [--metric val/loss] [--mode min|max] [--out DIR]``.

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
- ``curves.png`` when jobs have ``csv/metrics.csv``: the metric (and its ``train/`` counterpart) over steps.

For the metric the checkpoint callback monitors, the value is the best one (``best_score``, what
``train()`` returns to a sweeper), not the last validation's; its mode then also sets the sort order.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tiny_decoder.cli import run_cli
from tiny_decoder.run import run_dir
from tiny_decoder.run.run_dir import RunDir, find_runs, read_logged_rows

DEFAULT_METRIC = "val/loss"
DEFAULT_VALUE = "(default)"
ERROR_FILES = (run_dir.ERROR, run_dir.LOG)
MAX_ERROR = 160
ANNOTATION = {"ha": "center", "va": "bottom", "fontsize": 7}
NAN = float("nan")


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
    config = RunDir(job_dir).read_config()
    if config is None:
        return None
    checkpoint = ((config.get("callbacks") or {}).get("model_checkpoint")) or {}
    return (checkpoint["monitor"], checkpoint.get("mode", "min")) if checkpoint.get("monitor") else None


def flat_metrics(results: dict[str, Any], monitor: tuple[str, str] | None) -> dict[str, float]:
    metrics = {**results.get("train", {}), **results.get("val", {}), **results.get("test", {})}
    if monitor and results.get("best_score") is not None:
        metrics[monitor[0]] = results["best_score"]
    return {key: float(value) for key, value in metrics.items()}


def load_job(job_dir: Path, root: Path) -> Job:
    raw = read_overrides(job_dir)
    name = str(job_dir.relative_to(root)) or "."
    job = Job(name, job_dir, dict(map(parse_override, raw)), raw, monitor=read_monitor(job_dir))
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
    """Override keys whose value differs between jobs (absent counts as a value), in first-seen order."""
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


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


def read_curve(csv_path: Path, metric: str) -> tuple[list[float], list[float]]:
    rows = [row for row in read_logged_rows(csv_path, metric) if "step" in row]
    return [row["step"] for row in rows], [row[metric] for row in rows]


def curve_label(job: Job, swept: Sequence[str]) -> str:
    values = [f"{key}={job.overrides[key]}" for key in swept if key in job.overrides]
    return f"{job.name}: " + (", ".join(values) or DEFAULT_VALUE)


def plot_curves(jobs: Sequence[Job], swept: Sequence[str], metric: str, path: Path) -> Path | None:
    """The metric (and its ``train/`` counterpart) over steps, one line per job; None without any CSV log."""
    logged = [(job, RunDir(job.path).metrics_path) for job in jobs if RunDir(job.path).metrics_path.is_file()]
    train_metric = "train/" + metric.split("/", 1)[-1]
    curves = {name: [(job, read_curve(p, name)) for job, p in logged] for name in dict.fromkeys([metric, train_metric])}
    curves = {name: lines for name, lines in curves.items() if any(steps for _, (steps, _) in lines)}
    if not curves:
        return None
    figure = Figure(figsize=(1.5 + 5.0 * len(curves), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, lines) in zip(axes, curves.items(), strict=True):
        for job, (steps, values) in lines:
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=curve_label(job, swept))
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{name} over steps", fontsize=10)
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


def build_report(
    root: Path, metrics: Sequence[str] = (DEFAULT_METRIC,), out: Path | None = None, mode: str | None = None
) -> Report:
    root, out = Path(root), Path(out or root)
    jobs = load_jobs(root)
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
    curves = plot_curves(jobs, swept, metrics[0], out / "curves.png")
    files.update({"curves": curves} if curves else {})
    return Report(rows, columns, markdown, files, metrics[0])


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
        help=f"metric column (repeatable; the first sorts the rows and is plotted; default {DEFAULT_METRIC}); "
        "every test/* metric is added",
    )
    parser.add_argument("--mode", choices=("min", "max"), help="sort order (default: the checkpoint's mode, or min)")
    parser.add_argument("--out", type=Path, help="output directory (default: the multirun dir)")
    return parser.parse_args(argv)


def report(args: argparse.Namespace) -> Report:
    result = build_report(args.multirun_dir, args.metric or [DEFAULT_METRIC], args.out, args.mode)
    print(result.markdown)
    print("written: " + ", ".join(str(path) for path in result.files.values()))
    if "curves" not in result.files:
        print(f"no curves.png: no job has a csv/metrics.csv logging {result.metric}")
    return result


def main(argv: Sequence[str] | None = None) -> Report:
    return run_cli(report, parse_args(argv))


if __name__ == "__main__":
    main()
