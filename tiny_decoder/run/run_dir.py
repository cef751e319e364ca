"""The files of a run directory, in one place: ``train`` writes them, ``report``, ``resume=auto`` and the experiment
summaries read them, all through this module.

    <run>/.hydra/overrides.yaml   the command-line overrides (what identifies "the same command")
    <run>/.hydra/config.yaml      the composed config
    <run>/results.json            metrics of the best checkpoint, parameters, wall time (a finished run)
    <run>/error.txt               traceback, then ``<ExceptionType>: <message>`` (a failed run; other ranks:
                                  error_rank<N>.txt)
    <run>/csv/metrics.csv         every logged metric (the CSV logger)
    <run>/checkpoints/*.ckpt      best, last, periodic
    <run>/train.log               the run's log

A multirun directory holds one such run per job (``<sweep>/<job number>/``).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

OVERRIDES = Path(".hydra") / "overrides.yaml"
CONFIG = Path(".hydra") / "config.yaml"
RESULTS = Path("results.json")
ERROR = Path("error.txt")
METRICS = Path("csv") / "metrics.csv"
CHECKPOINTS = Path("checkpoints")
LOG = Path("train.log")


@dataclass(frozen=True)
class RunDir:
    """One run's directory and the files in it."""

    path: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run that wrote ``<run>/checkpoints/<name>.ckpt``."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def overrides_path(self) -> Path:
        return self.path / OVERRIDES

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def error_path(self, rank: int = 0) -> Path:
        return self.path / (ERROR if rank == 0 else Path(f"error_rank{rank}.txt"))

    def read_overrides(self) -> list[str] | None:
        """The run's command-line overrides; None when it did not record them."""
        if not self.overrides_path.is_file():
            return None
        return [str(entry) for entry in yaml.safe_load(self.overrides_path.read_text()) or []]

    def read_config(self) -> dict[str, Any] | None:
        return (yaml.safe_load(self.config_path.read_text()) or {}) if self.config_path.is_file() else None

    def read_results(self) -> dict[str, Any] | None:
        """``results.json``; None when the run has none (``json.JSONDecodeError`` when it is damaged)."""
        return json.loads(self.results_path.read_text()) if self.results_path.is_file() else None

    def write_results(self, results: dict[str, Any]) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        self.results_path.write_text(json.dumps(results, indent=2))
        return self.results_path

    def write_error(self, text: str, rank: int = 0) -> Path:
        path = self.error_path(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def clear_error(self, rank: int = 0) -> None:
        self.error_path(rank).unlink(missing_ok=True)

    def logged_rows(self, metric: str) -> list[dict[str, float]]:
        """The rows of ``csv/metrics.csv`` that logged ``metric`` (see :func:`read_logged_rows`)."""
        return read_logged_rows(self.metrics_path, metric)


def read_logged_rows(csv_path: Path, metric: str) -> list[dict[str, float]]:
    """The rows of a run's ``csv/metrics.csv`` that logged ``metric``, with every non-empty cell as a float."""
    with csv_path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(metric) not in (None, "")]
    return [{key: float(value) for key, value in row.items() if value not in (None, "")} for row in rows]


def find_runs(root: Path) -> list[RunDir]:
    """Every run directory under ``root`` (a multirun's jobs, or ``root`` itself), in natural order (2 < 10)."""
    paths = {path.parent.parent for path in root.rglob(str(OVERRIDES))}
    return [RunDir(path) for path in sorted(paths, key=natural_key)]


def natural_key(path: Path) -> list[Any]:
    """Sort key that orders ``job 2`` before ``job 10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def failed_runs(root: Path) -> list[Path]:
    """The ``error.txt`` files of the runs under ``root`` that failed."""
    return sorted(root.rglob(str(ERROR)))
