"""Studies (tiny_decoder/run/study.py and the study sweeper): the study file's checks name the arm and the field,
arms become phased jobs with stable directories and seed-independent overrides, and a tiny study run through the
real command line (2 arms x 3 seeds) reports n, means and paired differences equal to its jobs' own
results.json, and resumes without rerunning finished jobs."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from tests.helpers import CONF_DIR, run_module
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.run.study import (
    StudyJob,
    manifest,
    merge_overrides,
    parse_study,
    pending_jobs,
    study_phases,
)


def test_merge_overrides_later_layers_win_by_key():
    merged = merge_overrides(["+experiment=a", "trainer.max_steps=10"], ["trainer.max_steps=0", "+x.y=1"])
    assert merged == ["+experiment=a", "trainer.max_steps=0", "+x.y=1"]


def test_phases_order_arms_after_the_arm_they_start_from():
    study = parse_study(
        "s",
        {
            "base": [],
            "wide": ["model.d_model=64"],
            "pruned": {"from": "base", "overrides": ["init_from={from}/checkpoints/last.ckpt", "trainer.max_steps=0"]},
            "pruned_more": {"from": "pruned", "overrides": ["init_from={from}/checkpoints/last.ckpt"]},
        },
        seeds=[0, 1, 2],
        steps=100,
        common=["+experiment=sequence_seed"],
    )
    plan = study_phases(study, ["test=false"])
    assert [[job.subdir for job in phase] for phase in plan.phases] == [
        ["base/seed0", "base/seed1", "base/seed2", "wide/seed0", "wide/seed1", "wide/seed2"],
        ["pruned/seed0", "pruned/seed1", "pruned/seed2"],
        ["pruned_more/seed0", "pruned_more/seed1", "pruned_more/seed2"],
    ]
    pruned = plan.phases[1][1]
    # the arm's own max_steps wins over the study's budget; {from} is an interpolation the job resolves, so
    # the override text is the same for every seed (the report groups the seeds into one arm)
    assert pruned.overrides == (
        "+experiment=sequence_seed",
        "trainer.max_steps=0",
        "test=false",
        "init_from=${hydra:sweep.dir}/base/seed${seed}/checkpoints/last.ckpt",
        "seed=1",
    )
    assert pruned.launch_overrides()[-1] == "hydra.sweep.subdir=pruned/seed1"
    assert plan.phases[0][3].overrides == ("+experiment=sequence_seed", "trainer.max_steps=100", "test=false",
                                           "model.d_model=64", "seed=0")  # fmt: skip
    assert manifest(plan)["jobs"]["wide/seed0"] == list(plan.phases[0][3].overrides)


def test_pending_jobs_skip_the_ones_with_results(tmp_path: Path):
    jobs = [StudyJob("a", seed, ()) for seed in (0, 1, 2)]
    (tmp_path / "a" / "seed1").mkdir(parents=True)
    (tmp_path / "a" / "seed1" / "results.json").write_text("{}")
    (tmp_path / "a" / "seed2" / "checkpoints").mkdir(parents=True)  # killed: no results.json, runs again
    assert [job.subdir for job in pending_jobs(tmp_path, jobs)] == ["a/seed0", "a/seed2"]


@pytest.mark.parametrize(
    ("arms", "fields", "message"),
    [
        (None, {}, "study s: arms: no arms"),
        ({"a b": []}, {}, "study s: arm 'a b': an arm name is letters"),
        ({"a": "x=1"}, {}, "study s: arm a: a list of overrides"),
        ({"a": ["x"]}, {}, "study s: arm a: overrides: 'x' is not an override"),
        ({"a": ["seed=3"]}, {}, "study s: arm a: overrides: 'seed=3': the study sets seed itself"),
        ({"a": {"overrides": [], "form": "b"}}, {}, "study s: arm a: form: not an arm field"),
        ({"a": {"from": "zz", "overrides": ["init_from={from}/x"]}}, {}, "study s: arm a: from: no arm named 'zz'"),
        ({"a": {"overrides": ["init_from={from}/x"]}}, {}, "study s: arm a: overrides: uses {from} but the arm has no"),
        ({"a": [], "b": {"from": "a", "overrides": ["x=1"]}}, {}, "study s: arm b: from: from: a but no override uses"),
        (
            {"a": {"from": "b", "overrides": ["i={from}"]}, "b": {"from": "a", "overrides": ["i={from}"]}},
            {},
            "study s: arm a: from: arms start from each other in a circle (a -> b -> a)",
        ),
        ({"a": []}, {"seeds": [0, 0]}, "study s: seeds: each seed once"),
        ({"a": []}, {"seeds": []}, "study s: seeds: a non-empty list"),
        ({"a": []}, {"steps": 0}, "study s: steps: the optimizer steps"),
        ({"a": []}, {"baseline": "b"}, "study s: baseline: no arm named 'b' (arms: a)"),
        ({"a": []}, {"mode": "lowest"}, "study s: mode: min, max or null"),
    ],
)
def test_bad_study_files_name_the_arm_and_the_field(arms, fields, message):
    with pytest.raises(ConfigError) as raised:
        parse_study("s", arms, **fields)
    assert str(raised.value).startswith(message)


def write_study(config_dir: Path, name: str, body: str) -> None:
    (config_dir / "study").mkdir(parents=True, exist_ok=True)
    (config_dir / "study" / f"{name}.yaml").write_text(textwrap.dedent(body))


TINY_STUDY = """\
    # @package _global_
    defaults:
      - base/local
      - _self_
    hydra:
      sweeper:
        seeds: [0, 1, 2]
        steps: 8
        common: [+experiment=sequence_seed, test=false, trainer.val_check_interval=8, data.val_samples=64,
                 "~callbacks.samples", "~callbacks.attention_maps", "~callbacks.rich_model_summary",
                 "~callbacks.rich_progress_bar", trainer.enable_progress_bar=false]
        arms:
          baseline: []
          narrow: [model.d_model=16]
"""


def test_a_bad_arm_fails_before_any_job_with_one_line(tmp_path: Path):
    write_study(tmp_path / "conf", "broken", TINY_STUDY.replace("[model.d_model=16]", "[attention=fancy]"))
    result = run_module("tiny_decoder.train", "--config-dir", str(tmp_path / "conf"), "study=broken", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: study broken: arm narrow: "), result.stderr
    assert "attention" in errors[-1] and "Traceback" not in result.stderr
    assert not list((tmp_path / "multirun").rglob("results.json")) if (tmp_path / "multirun").exists() else True


@pytest.mark.slow
def test_a_tiny_study_end_to_end_reports_its_jobs_and_resumes(tmp_path: Path):
    write_study(tmp_path / "conf", "tiny", TINY_STUDY)
    command = ("tiny_decoder.train", "--config-dir", str(tmp_path / "conf"), "study=tiny")
    first = run_module(*command, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    study_dir = tmp_path / "multirun" / "study" / "tiny"
    results = {
        (arm, seed): json.loads((study_dir / arm / f"seed{seed}" / "results.json").read_text())
        for arm in ("baseline", "narrow")
        for seed in (0, 1, 2)
    }
    # the jobs trained the study's budget, with their own seed, one torch thread each
    assert {r["global_step"] for r in results.values()} == {8}
    assert {r["torch_threads"] for r in results.values()} == {1}
    assert yaml.safe_load((study_dir / "narrow" / "seed2" / ".hydra" / "overrides.yaml").read_text())[-1] == "seed=2"

    def loss(arm: str, seed: int) -> float:
        r = results[(arm, seed)]
        return r["best_score"] if r["best_score"] is not None else r["val"]["val/loss"]

    rows = {row["arm"]: row for row in csv_rows(study_dir / "arms.csv") if row["metric"] == "val/loss"}
    assert set(rows) == {"baseline", "narrow"}
    for arm in ("baseline", "narrow"):
        values = [loss(arm, seed) for seed in (0, 1, 2)]
        assert int(rows[arm]["n"]) == 3
        assert math.isclose(float(rows[arm]["mean"]), statistics.mean(values), rel_tol=1e-9)
        assert math.isclose(float(rows[arm]["sd"]), statistics.stdev(values), rel_tol=1e-9)
    differences = [loss("narrow", seed) - loss("baseline", seed) for seed in (0, 1, 2)]
    assert math.isclose(float(rows["narrow"]["diff_mean"]), statistics.mean(differences), rel_tol=1e-9)
    half_width = 4.302652729749464 * statistics.stdev(differences) / math.sqrt(3)  # t(0.975, 2)
    assert math.isclose(float(rows["narrow"]["diff_ci_low"]), statistics.mean(differences) - half_width, rel_tol=1e-6)
    assert rows["baseline"]["verdict"] == "baseline"
    assert "| narrow | 3 |" in (study_dir / "arms.md").read_text()

    # rerun: nothing to do; then a job whose results are gone (killed) runs again, alone
    stamps = {key: (study_dir / key[0] / f"seed{key[1]}" / "results.json").stat().st_mtime for key in results}
    (study_dir / "narrow" / "seed1" / "results.json").unlink()
    again = run_module(*command, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "phase 1 of 1: 6 jobs, 5 finished before, 1 to run" in again.stdout + again.stderr
    for key, stamp in stamps.items():
        path = study_dir / key[0] / f"seed{key[1]}" / "results.json"
        assert path.is_file()
        if key != ("narrow", 1):
            assert path.stat().st_mtime == stamp
    rerun = json.loads((study_dir / "narrow" / "seed1" / "results.json").read_text())
    assert rerun["val"]["val/loss"] == pytest.approx(results[("narrow", 1)]["val"]["val/loss"], rel=1e-6)


def csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_a_study_goes_to_a_cluster_through_the_submitit_launcher_unchanged():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["study=ablations", "hydra/launcher=slurm_gpu"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    hydra = cfg.hydra
    assert hydra.launcher._target_.endswith("SlurmLauncher") and hydra.launcher.gpus_per_node == 1
    assert hydra.sweeper._target_.endswith("StudySweeper") and hydra.mode == RunMode.MULTIRUN
    assert hydra.sweep.dir == "multirun/study/ablations"
    assert hydra.runtime.choices.study == "ablations" and "+experiment=sequence_ablation" in hydra.sweeper.common
