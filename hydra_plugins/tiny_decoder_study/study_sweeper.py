"""``StudySweeper``: runs a study (``conf/study/NAME.yaml``: arms x seeds) as a Hydra multirun.

``python -m tiny_decoder.train study=NAME`` (the study config turns on multirun and picks this sweeper). The sweeper
checks the study and composes every job's config before the first job starts (a bad arm is one line naming it and
the field), skips the jobs that already have a ``results.json`` (so rerunning the command resumes a study; a killed
job continues from its ``last.ckpt``), launches the rest through the configured launcher (``hydra/launcher``:
joblib locally, submitit on a cluster) phase by phase (arms that start ``from`` another arm's checkpoints run after
it), writes ``study.yaml`` (the plan) and finally the seed-replicated report (``tiny_decoder.report``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from tiny_decoder.cli import composition_message
from tiny_decoder.core.errors import ConfigError, one_line
from tiny_decoder.run.config_checks import validate_config
from tiny_decoder.run.study import StudyJob, StudyPlan, parse_study, pending_jobs, study_phases, write_manifest

log = logging.getLogger(__name__)


class StudySweeper(Sweeper):
    """Hydra sweeper of a study: the fields are the study file's (``hydra.sweeper.*``), see run/study.py."""

    def __init__(
        self,
        name: str,
        arms: Any,
        seeds: Sequence[int] = (0, 1, 2),
        steps: int | None = None,
        common: Sequence[str] | None = None,
        baseline: str | None = None,
        metrics: Sequence[str] | None = None,
        mode: str | None = None,
        report: bool = True,
    ) -> None:
        def plain(value: Any) -> Any:
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

        self.fields = {
            "name": name,
            "arms": plain(arms),
            "seeds": plain(seeds),
            "steps": steps,
            "common": plain(common),
            "baseline": baseline,
            "metrics": plain(metrics),
            "mode": mode,
        }
        self.write_report = report
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        study = parse_study(**self.fields)
        plan = study_phases(study, self._command_line(study.name, arguments))
        self._check_jobs(plan)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        write_manifest(sweep_dir, plan)
        started = time.perf_counter()
        returns = []
        job_index = 0
        for number, phase in enumerate(plan.phases, start=1):
            todo = pending_jobs(sweep_dir, phase)
            log.info(
                "study %s, phase %d of %d: %d jobs, %d finished before, %d to run",
                study.name, number, len(plan.phases), len(phase), len(phase) - len(todo), len(todo),
            )  # fmt: skip
            if not todo:
                continue
            results = self.launcher.launch([job.launch_overrides() for job in todo], initial_job_idx=job_index)
            job_index += len(todo)
            returns.append(results)
        elapsed = time.perf_counter() - started
        log.info("study %s: %d jobs in %.0f s; directory %s", study.name, len(plan.jobs), elapsed, sweep_dir)
        if self.write_report:
            self._report(sweep_dir, study.name)
        return returns

    def _command_line(self, name: str, arguments: Sequence[str]) -> list[str]:
        """The command line's overrides (for every job) apart from the study choice itself; no sweeps."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        kept = []
        for override in parser.parse_overrides(list(arguments)):
            if override.is_sweep_override():
                raise ConfigError(
                    f"study {name}: {override.input_line}: a study lists its arms in its file; drop the sweep from "
                    "the command line (or add arms to the study)"
                )
            kept.append(override.input_line)
        return kept

    def _check_jobs(self, plan: StudyPlan) -> None:
        """Compose (and range-check) every job's config before anything runs: one line naming the arm otherwise."""
        assert self.hydra_context is not None and self.config is not None
        for job in {job.arm: job for job in plan.jobs}.values():  # one seed per arm: the seeds differ in seed only
            try:
                config = self.hydra_context.config_loader.load_sweep_config(self.config, job.launch_overrides())
                validate_config(config)
            except ConfigError as error:
                raise ConfigError(f"study {plan.study.name}: arm {job.arm}: {one_line(error)}") from error
            except Exception as error:  # Hydra's composition errors: an unknown group option, a bad key
                raise ConfigError(f"study {plan.study.name}: arm {job.arm}: {composition_message(error)}") from error

    def _report(self, sweep_dir: Path, name: str) -> None:
        """The report of the study's directory: its ``study.yaml`` gives the arms, metrics, mode and baseline."""
        from tiny_decoder.report import build_report  # the report tool (matplotlib) only once the jobs ended

        try:
            report = build_report(sweep_dir)
        except Exception as error:  # the runs are kept whatever happens here; say how to rebuild the report
            log.error(
                "study %s: the report failed (%s); rebuild it: python -m tiny_decoder.report %s",
                name, one_line(error), sweep_dir,
            )  # fmt: skip
            return
        log.info("study %s: report in %s", name, report.files.get("arms_markdown", sweep_dir))


__all__ = ["StudyJob", "StudySweeper"]
