"""The shape of the config tree in ``conf/``: what overrides what, the recipes' shared bases, the tools' shared
Hydra settings.

* ``conf/train.yaml`` lists ``_self_`` first: its own keys (``seed``, ``test``, ``compile``, ``optimized_metric``,
  ...) are defaults that a group file, a recipe, ``hparams_search`` or ``debug`` can override, and the command
  line overrides them all. The probe group files live in ``tmp_path``, added to the search path.
* ``conf/experiment/base/`` holds what the recipes of a task share; the bases are not recipes themselves.
* ``conf/hydra/tool.yaml`` holds the Hydra settings of the tools (run in place, write nothing, warnings only).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from tests.helpers import CONF_DIR

LM_RECIPES = ["shakespeare_char", "stories15m", "stories260k", "stories_tiny"]
SEQUENCE_RECIPES = ["sequence_ablation", "sequence_fd", "sequence_seed", "sequence_strong"]
TOOLS = ["generate", "evaluate", "estimate", "summary"]

# root keys of conf/train.yaml and values that differ from theirs
ROOT_KEYS: dict[str, Any] = {"seed": 7, "test": False, "compile": True, "optimized_metric": "val/accuracy"}


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def with_probes(tmp_path: Path, *overrides: str) -> list[str]:
    """``overrides`` with ``tmp_path`` on Hydra's search path: its group files extend the real ``conf/``."""
    return [f"hydra.searchpath=[file://{tmp_path}]", *overrides]


def root_key_lines() -> str:
    """``ROOT_KEYS`` as YAML lines (booleans lower-case)."""
    return "".join(
        f"{key}: {str(value).lower() if isinstance(value, bool) else value}\n" for key, value in ROOT_KEYS.items()
    )


def test_root_keys_are_defaults(hydra_conf):
    cfg = compose("train")
    assert {key: cfg[key] for key in ROOT_KEYS} == {
        "seed": 0,
        "test": True,
        "compile": False,
        "optimized_metric": "val/loss",
    }


@pytest.mark.parametrize("group", ["debug", "hparams_search"])
def test_a_global_group_file_overrides_root_keys(hydra_conf, tmp_path: Path, group: str):
    write(tmp_path / group / "probe.yaml", "# @package _global_\n" + root_key_lines())
    cfg = compose("train", overrides=with_probes(tmp_path, "+experiment=sequence_seed", f"{group}=probe"))
    assert {key: cfg[key] for key in ROOT_KEYS} == ROOT_KEYS
    assert cfg.callbacks.exact_resume.seed == ROOT_KEYS["seed"]  # ${seed} follows the group's value


def test_a_group_in_the_root_defaults_overrides_root_keys(hydra_conf, tmp_path: Path):
    # a data config (# @package _global_, before debug and hparams_search in the root defaults) setting the seed
    write(tmp_path / "data" / "probe.yaml", "# @package _global_\ndefaults:\n  - sequences\n  - _self_\nseed: 7\n")
    cfg = compose("train", overrides=with_probes(tmp_path, "data=probe"))
    assert cfg.seed == 7 and cfg.data.seed == 7


def test_the_command_line_overrides_a_group_file(hydra_conf, tmp_path: Path):
    write(tmp_path / "debug" / "probe.yaml", "# @package _global_\n" + root_key_lines())
    cfg = compose("train", overrides=with_probes(tmp_path, "debug=probe", "seed=3", "test=true"))
    assert (cfg.seed, cfg.test, cfg.optimized_metric) == (3, True, ROOT_KEYS["optimized_metric"])


def test_the_experiment_options_are_the_recipes_not_their_bases(hydra_conf):
    loader = GlobalHydra.instance().config_loader()
    assert sorted(loader.get_group_options("experiment")) == sorted(LM_RECIPES + SEQUENCE_RECIPES)
    assert sorted(loader.get_group_options("experiment/base")) == ["lm", "sequence"]


@pytest.mark.parametrize("recipe", LM_RECIPES)
def test_language_model_recipes_share_their_base(hydra_conf, recipe: str):
    cfg = compose("train", overrides=[f"+experiment={recipe}"], return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    assert (choices.task, choices.norm, choices.attention, choices.optimizer, choices.scheduler) == (
        "lm",
        "pre",
        "sdpa",
        "adamw",
        "warmup_cosine",
    )
    assert cfg.trainer.max_epochs == -1 and cfg.trainer.check_val_every_n_epoch is None
    assert cfg.trainer.max_steps > 0 and cfg.trainer.val_check_interval > 0  # the recipe's own numbers
    assert cfg.test is False


@pytest.mark.parametrize("recipe", SEQUENCE_RECIPES)
def test_sequence_recipes_share_their_base(hydra_conf, recipe: str):
    cfg = compose("train", overrides=[f"+experiment={recipe}"], return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    assert (choices.task, choices.data, choices.activation) == ("sequence", "sequences", "gelu")
    assert "experiment/base" not in choices  # pulled in as a config, not picked as a group option


def test_a_recipe_overrides_what_its_base_picks(hydra_conf, tmp_path: Path):
    write(
        tmp_path / "experiment" / "probe.yaml",
        "# @package _global_\ndefaults:\n  - base/lm\n  - override /data: tinystories\n"
        "  - override /model: stories_tiny\n  - override /norm: post\n  - _self_\ntest: true\n",
    )
    cfg = compose("train", overrides=with_probes(tmp_path, "+experiment=probe"))
    assert cfg.task._target_.endswith("LanguageModel") and cfg.attention.name == "sdpa"  # from the base
    assert cfg.norm.placement == "post" and cfg.test is True  # the recipe's own
    cfg = compose("train", overrides=with_probes(tmp_path, "+experiment=probe", "norm=none"))
    assert cfg.norm.placement == "none"  # the command line wins over both


def tool_hydra(name: str, *overrides: str) -> DictConfig:
    return compose(name, overrides=list(overrides), return_hydra_config=True).hydra


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_run_in_place_and_log_warnings_to_the_console_only(hydra_conf, tool: str):
    hydra = tool_hydra(tool, "ckpt=x") if tool in ("generate", "evaluate") else tool_hydra(tool)
    assert hydra.run.dir == "." and hydra.output_subdir is None
    logging = hydra.job_logging
    assert logging.root.level == "WARN" and list(logging.root.handlers) == ["console"]
    assert logging.handlers.file.delay is True  # defined, attached to no logger, never opens <tool>.log
    # evaluate's stdout is its table, generate's the generated text: their warnings go to stderr
    stream = "ext://sys.stderr" if tool in ("evaluate", "generate") else "ext://sys.stdout"
    assert logging.handlers.console.stream == stream


def test_training_keeps_its_run_directory_and_log_file(hydra_conf):
    hydra = compose("train", return_hydra_config=True).hydra
    assert hydra.run.dir.startswith("outputs/") and hydra.output_subdir == ".hydra"
    assert "file" in hydra.job_logging.root.handlers
