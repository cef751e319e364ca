"""The W&B sweep files in ``sweeps/`` cannot rot: each is a well-formed sweep whose ``command`` runs the training
entry point and logs to W&B; every value it can draw (every grid point; for random / Bayesian sweeps every
listed value and a few random draws) composes into a valid config; and one drawn command line trains for a
few steps, as ``wandb agent`` would run it."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from tests.helpers import CONF_DIR, REPO_ROOT, SHARED_DATA, run_module, run_train
from tiny_decoder.run.config_checks import build_model_config, validate_config

SWEEPS = sorted((REPO_ROOT / "sweeps").glob("*.yaml"))
ENTRY = ["${env}", "python", "-m", "tiny_decoder.train"]

# how W&B draws a value: a parameter has `value`, `values` (categorical) or a `distribution` with min / max
DRAWS: dict[str, Callable[[dict[str, Any], random.Random], Any]] = {
    "constant": lambda spec, rng: spec["value"],
    "categorical": lambda spec, rng: rng.choice(spec["values"]),
    "uniform": lambda spec, rng: rng.uniform(spec["min"], spec["max"]),
    "int_uniform": lambda spec, rng: rng.randint(spec["min"], spec["max"]),
    "log_uniform_values": lambda spec, rng: math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"]))),
}


def kind(spec: dict[str, Any]) -> str:
    return "constant" if "value" in spec else spec.get("distribution", "categorical")


def draw(parameters: dict[str, dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    return {name: DRAWS[kind(spec)](spec, rng) for name, spec in parameters.items()}


def points(sweep: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    """Every grid point; otherwise each listed value of each parameter (others drawn) plus 3 random draws."""
    parameters = sweep["parameters"]
    if sweep["method"] == "grid":
        names = list(parameters)
        values = [spec["values"] if "values" in spec else [spec["value"]] for spec in parameters.values()]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]
    listed = [
        {**draw(parameters, rng), name: value} for name, spec in parameters.items() for value in spec.get("values", [])
    ]
    return listed + [draw(parameters, rng) for _ in range(3)]


def command_line(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command ``wandb agent`` runs for ``params`` (its macros expanded)."""
    macros = {
        "${env}": [],
        "${interpreter}": ["python"],
        "${program}": [sweep.get("program", "")],
        "${args_no_hyphens}": [f"{name}={value}" for name, value in params.items()],
        "${args}": [f"--{name}={value}" for name, value in params.items()],
    }
    return [part for word in sweep["command"] for part in macros.get(word, [word])]


def experiment_of(sweep: dict[str, Any]) -> str:
    (experiment,) = [word.split("=", 1)[1] for word in sweep["command"] if word.startswith("+experiment=")]
    return experiment


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


QUIET = [
    "~callbacks.rich_progress_bar",
    "~callbacks.rich_model_summary",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# per experiment: overrides that make a sweep's command train for a few steps (a new experiment needs an entry)
FAST: dict[str, Callable[[Path], list[str]]] = {
    "sequence_strong": lambda tmp: [
        *QUIET,
        "trainer.max_epochs=1",
        "data.train_samples_per_epoch=256",
        "data.val_samples=64",
        "data.test_samples=64",
    ],
    "stories_tiny": lambda tmp: [
        *QUIET,
        f"data.files.train={SHARED_DATA / 'tinystories' / 'tinystories_v2_train_head.txt'}",
        f"data.files.validation={SHARED_DATA / 'tinystories' / 'tinystories_valid_head.txt'}",
        f"data.cache_dir={tmp / 'cache'}",
        "data.max_train_docs=200",
        "data.max_val_blocks=4",
        "data.vocab_size=512",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
    ],
}
NEEDS_SHARED_DATA = {"stories_tiny"}


def test_there_is_a_sweep_per_task():
    assert {experiment_of(load(path)) for path in SWEEPS} >= {"sequence_strong", "stories_tiny"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_is_well_formed(path: Path):
    sweep = load(path)
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"] == {"name": "val/loss", "goal": "minimize"}  # logged under that name by every task
    assert sweep["command"][:4] == ENTRY and "${args_no_hyphens}" in sweep["command"]
    assert any(word in ("logger=wandb", "logger=many") for word in sweep["command"])  # reports to the sweep
    assert (CONF_DIR / "experiment" / f"{experiment_of(sweep)}.yaml").is_file()
    assert experiment_of(sweep) in FAST, "add fast overrides for this experiment to FAST"
    for name, spec in sweep["parameters"].items():
        assert kind(spec) in DRAWS, f"{name}: unknown distribution"
        assert sweep["method"] != "grid" or kind(spec) in ("constant", "categorical"), f"{name}: grid needs values"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_value_of_the_sweep_makes_a_valid_config(path: Path):
    sweep = load(path)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for params in points(sweep, random.Random(0)):
            cfg = compose("train", overrides=command_line(sweep, params)[3:])
            validate_config(cfg)
            build_model_config(cfg, instantiate(cfg.data, _convert_="all"))  # raises ConfigError if invalid
    GlobalHydra.instance().clear()


# the TinyStories sweep trains a language model (~40 s on 2 busy cores): in the slow suite
DRAWN = [pytest.param(path, marks=pytest.mark.slow) if "stories" in path.stem else path for path in SWEEPS]


@pytest.mark.parametrize("path", DRAWN, ids=lambda p: p.stem)
def test_drawn_command_line_trains(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    sweep = load(path)
    experiment = experiment_of(sweep)
    if experiment in NEEDS_SHARED_DATA and not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    command = command_line(sweep, draw(sweep["parameters"], random.Random(1)))
    code = run_train(monkeypatch, *command[3:], *FAST[experiment](tmp_path), f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, command
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert math.isfinite(results["val"]["val/loss"])


@pytest.mark.slow
def test_sweep_command_runs_as_a_process(tmp_path: Path):
    sweep = load(REPO_ROOT / "sweeps" / "sequence_grid.yaml")
    command = command_line(sweep, draw(sweep["parameters"], random.Random(2)))
    assert command[:3] == ["python", "-m", "tiny_decoder.train"]
    result = run_module(command[2], *command[3:], *FAST["sequence_strong"](tmp_path), f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results.json").is_file()
