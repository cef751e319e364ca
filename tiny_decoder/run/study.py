"""Studies: arms x seeds, as data. A study file (``conf/study/NAME.yaml``) names its arms (override sets), its
seeds and its budget (``steps``); :func:`parse_study` checks it and says, in one line naming the arm and the field,
what is wrong before any job starts; :func:`study_phases` turns it into the jobs of a Hydra multirun, in phases:
first the arms that train from scratch, then the arms that start ``from`` another arm's checkpoints (pruning,
early-exit thresholds, distillation from a trained teacher), each in the order its dependencies allow.

Each job is ``<arm>/seed<k>`` under the study's directory (``hydra.sweep.subdir``), so a study can be run again
with the same command: a job with a ``results.json`` is finished and not rerun (:func:`pending_jobs`), a killed job
continues from its ``last.ckpt`` (the study configs set ``resume=auto`` in the job's own directory).

In an arm's overrides ``{from}`` stands for that seed's job directory of the arm named by ``from``; it is written
as an interpolation (``${hydra:sweep.dir}/<arm>/seed${seed}``) that the job resolves, so the override text is the
same for every seed and ``report`` groups the seeds into one arm. The Hydra sweeper that runs a study is
``hydra_plugins/tiny_decoder_study``; this module holds no Hydra machinery.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.run.run_dir import RunDir

ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
FROM_PLACEHOLDER = "{from}"
ARM_FIELDS = ("overrides", "from", "about")
MANIFEST = "study.yaml"


@dataclass(frozen=True)
class Arm:
    """One arm: its overrides (on top of the study's ``common`` ones) and the arm it starts from, if any."""

    name: str
    overrides: tuple[str, ...]
    after: str | None = None  # the arm whose checkpoints this one starts from ({from})
    about: str = ""


@dataclass(frozen=True)
class Study:
    """A checked study file."""

    name: str
    seeds: tuple[int, ...]
    common: tuple[str, ...]
    arms: tuple[Arm, ...]
    baseline: str
    metrics: tuple[str, ...] = ("val/loss",)
    mode: str | None = None

    def arm(self, name: str) -> Arm:
        return next(arm for arm in self.arms if arm.name == name)


@dataclass(frozen=True)
class StudyJob:
    """One arm x seed: its directory under the study and its overrides."""

    arm: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def subdir(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    def launch_overrides(self) -> list[str]:
        """What the launcher gets: the job's overrides and its directory (a Hydra override, not in the run's)."""
        return [*self.overrides, f"hydra.sweep.subdir={self.subdir}"]


@dataclass
class StudyPlan:
    """The jobs of a study in phases (a phase's jobs run in parallel; a phase starts when the previous ended)."""

    study: Study
    phases: list[list[StudyJob]] = field(default_factory=list)

    @property
    def jobs(self) -> list[StudyJob]:
        return [job for phase in self.phases for job in phase]


def override_key(override: str) -> str:
    """``+model.d_model=64`` -> ``model.d_model``."""
    return override.split("=", 1)[0].strip().lstrip("+~")


def merge_overrides(*layers: Sequence[str]) -> list[str]:
    """The overrides of all layers, a later layer's override of a key replacing an earlier one (Hydra refuses
    two values for one key), in first-seen order."""
    merged: dict[str, str] = {}
    for layer in layers:
        for override in layer:
            merged[override_key(override)] = override
    return list(merged.values())


def _fail(study: str, where: str, message: str) -> ConfigError:
    return ConfigError(f"study {study}: {where}: {message}")


def _overrides(study: str, where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _fail(study, where, f"a list of overrides (key=value strings), got {value!r}")
    for override in value:
        if not isinstance(override, str) or ("=" not in override and not override.startswith("~")):
            raise _fail(study, where, f"{override!r} is not an override (key=value, +key=value or ~key)")
        if override_key(override) in ("seed", "hydra.sweep.subdir"):
            raise _fail(study, where, f"{override!r}: the study sets {override_key(override)} itself (seeds: [...])")
    return tuple(value)


def _arm(study: str, name: Any, spec: Any) -> Arm:
    if not isinstance(name, str) or not ARM_NAME.match(name):
        raise _fail(study, f"arm {name!r}", "an arm name is letters, digits, '_', '.', '-' (it names a directory)")
    where = f"arm {name}"
    if spec is None or isinstance(spec, (list, tuple)):
        return Arm(name, _overrides(study, f"{where}: overrides", spec))
    if not isinstance(spec, Mapping):
        raise _fail(study, where, f"a list of overrides or a mapping with {', '.join(ARM_FIELDS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(ARM_FIELDS))
    if unknown:
        raise _fail(study, f"{where}: {unknown[0]}", f"not an arm field (fields: {', '.join(ARM_FIELDS)})")
    overrides = _overrides(study, f"{where}: overrides", spec.get("overrides"))
    after = spec.get("from")
    uses_from = any(FROM_PLACEHOLDER in o for o in overrides)
    if after is None and uses_from:
        raise _fail(study, f"{where}: overrides", f"uses {FROM_PLACEHOLDER} but the arm has no 'from: ARM'")
    if after is not None and not uses_from:
        raise _fail(
            study, f"{where}: from", f"from: {after} but no override uses {FROM_PLACEHOLDER} (its job directory)"
        )
    return Arm(name, overrides, None if after is None else str(after), str(spec.get("about") or ""))


def _seeds(study: str, seeds: Any) -> tuple[int, ...]:
    if not isinstance(seeds, Sequence) or isinstance(seeds, str) or not seeds:
        raise _fail(study, "seeds", f"a non-empty list of integers, got {seeds!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise _fail(study, "seeds", f"integers >= 0, got {list(seeds)!r}")
    if len(set(seeds)) != len(seeds):
        raise _fail(study, "seeds", f"each seed once, got {list(seeds)!r}")
    return tuple(seeds)


def parse_study(
    name: str,
    arms: Mapping[str, Any] | None,
    seeds: Sequence[int] | None = (0, 1, 2),
    steps: int | None = None,
    common: Sequence[str] | None = None,
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    mode: str | None = None,
) -> Study:
    """Check a study file's fields; :class:`ConfigError` naming the arm and the field otherwise."""
    if not arms or not isinstance(arms, Mapping):
        raise _fail(name, "arms", "no arms: give arms: {NAME: [override, ...], ...}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise _fail(name, "steps", f"the optimizer steps of every training arm, an integer >= 1, got {steps!r}")
    budget = [f"trainer.max_steps={steps}"] if steps is not None else []
    parsed = tuple(_arm(name, arm, spec) for arm, spec in arms.items())
    names = [arm.name for arm in parsed]
    for arm in parsed:
        if arm.after is not None and arm.after not in names:
            raise _fail(name, f"arm {arm.name}: from", f"no arm named {arm.after!r} (arms: {', '.join(names)})")
    _check_acyclic(name, parsed)
    chosen = baseline or names[0]
    if chosen not in names:
        raise _fail(name, "baseline", f"no arm named {chosen!r} (arms: {', '.join(names)})")
    if mode not in (None, "min", "max"):
        raise _fail(name, "mode", f"min, max or null (the checkpoint monitor's), got {mode!r}")
    return Study(
        name=name,
        seeds=_seeds(name, list(seeds) if seeds is not None else None),
        common=(*_overrides(name, "common", common), *budget),
        arms=parsed,
        baseline=chosen,
        metrics=tuple(metrics or ("val/loss",)),
        mode=mode,
    )


def _check_acyclic(name: str, arms: Sequence[Arm]) -> None:
    after = {arm.name: arm.after for arm in arms}
    for arm in arms:
        seen = [arm.name]
        while after.get(seen[-1]) is not None:
            seen.append(str(after[seen[-1]]))
            if seen[-1] in seen[:-1]:
                raise _fail(
                    name, f"arm {arm.name}: from", f"arms start from each other in a circle ({' -> '.join(seen)})"
                )


def job_overrides(study: Study, arm: Arm, seed: int, command_line: Sequence[str] = ()) -> tuple[str, ...]:
    """The study's common overrides, then the command line's, then the arm's (each later one wins), and the seed."""
    own = [o.replace(FROM_PLACEHOLDER, f"${{hydra:sweep.dir}}/{arm.after}/seed${{seed}}") for o in arm.overrides]
    return (*merge_overrides(study.common, command_line, own), f"seed={seed}")


def study_phases(study: Study, command_line: Sequence[str] = ()) -> StudyPlan:
    """Every arm x seed, an arm in the phase after the one of the arm it starts from."""
    depth: dict[str, int] = {}

    def level(arm: Arm) -> int:
        if arm.name not in depth:
            depth[arm.name] = 0 if arm.after is None else level(study.arm(arm.after)) + 1
        return depth[arm.name]

    plan = StudyPlan(study)
    for arm in study.arms:
        while len(plan.phases) <= level(arm):
            plan.phases.append([])
        plan.phases[level(arm)].extend(
            StudyJob(arm.name, seed, job_overrides(study, arm, seed, command_line)) for seed in study.seeds
        )
    return plan


def is_finished(sweep_dir: Path, job: StudyJob) -> bool:
    """A job whose directory holds a ``results.json`` ran to its end."""
    return RunDir(sweep_dir / job.subdir).results_path.is_file()


def pending_jobs(sweep_dir: Path, jobs: Sequence[StudyJob]) -> list[StudyJob]:
    return [job for job in jobs if not is_finished(sweep_dir, job)]


def manifest(plan: StudyPlan) -> dict[str, Any]:
    """``study.yaml`` in the study's directory: its arms, seeds and each job's directory and overrides."""
    study = plan.study
    return {
        "study": study.name,
        "baseline": study.baseline,
        "seeds": list(study.seeds),
        "metrics": list(study.metrics),
        "mode": study.mode,
        "common": list(study.common),
        "arms": {
            arm.name: {"overrides": list(arm.overrides), "from": arm.after, "about": arm.about} for arm in study.arms
        },
        "jobs": {job.subdir: list(job.overrides) for job in plan.jobs},
    }


def write_manifest(sweep_dir: Path, plan: StudyPlan) -> Path:
    path = sweep_dir / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest(plan), sort_keys=False))
    return path


def read_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    """The study manifest of a study directory (None for a plain multirun)."""
    path = sweep_dir / MANIFEST
    return yaml.safe_load(path.read_text()) if path.is_file() else None
