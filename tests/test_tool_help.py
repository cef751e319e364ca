"""``python -m tiny_decoder.<tool> --help`` for generate, evaluate, estimate, summary, export and convert: each
names its own tool, lists its own options with the defaults its config really has (not the training config groups,
where the tool takes none), and the usage examples it prints run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from tests.helpers import CONF_DIR, REPO_ROOT, run_module, run_tool

TOOLS = ("generate", "evaluate", "estimate", "summary", "export", "convert")
# the options each help must list (key=...); generate and evaluate: every key of their config, checked below
OWN_OPTIONS = {
    "generate": {"ckpt", "sequence", "steps", "prompt", "max_new_tokens", "temperature", "top_k", "top_p",
                 "num_samples", "seed", "device", "compile", "weights"},
    "evaluate": {"ckpt", "output", "batch_size", "seed", "device", "n", "data.files.train", "data.files.validation",
                 "data.files.test", "data.hub_dataset", "data.text_format", "data.cache_dir", "data.tokenizer_path",
                 "max_blocks", "lambada", "lambada_limit", "harness_tasks", "harness_limit"},
    "estimate": {"+experiment", "budget_gb", "precision", "data.batch_size"},
    "summary": {"+experiment", "input", "attention_png", "ckpt", "seed"},
    "export": {"ckpt", "format", "out", "version"},
    "convert": {"src", "out", "tokenizer"},
}  # fmt: skip
# the options whose "(default X)" is checked against the composed config (the others say "the recipe's")
CHECKED_DEFAULTS = {
    "generate": OWN_OPTIONS["generate"],
    "evaluate": OWN_OPTIONS["evaluate"],
    "estimate": {"budget_gb", "precision"},
    "summary": {"input", "attention_png", "ckpt", "seed"},
    "export": OWN_OPTIONS["export"],
    "convert": OWN_OPTIONS["convert"],
}
FIXTURES = REPO_ROOT / "tests" / "fixtures"
# the placeholders of the examples -> the small checkpoints of tests/fixtures (a sequence task, a language model)
CHECKPOINTS = {
    "outputs/sequence/DATE/TIME/checkpoints/last.ckpt": FIXTURES / "v1_sequence.ckpt",
    "outputs/lm/DATE/TIME/checkpoints/last.ckpt": FIXTURES / "v1_lm.ckpt",
}
OPTION_LINE = re.compile(r"^\s+(\+?[a-z_.]+)=\S*\s+(.*)$")


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    """Each tool's ``--help``, run as a user runs it (once for the module, two at a time: mostly imports)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda tool: run_module(f"tiny_decoder.{tool}", "--help"), TOOLS)
        return dict(zip(TOOLS, results, strict=True))


def tool_config(tool: str) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=tool)
    finally:
        GlobalHydra.instance().clear()


def options(help_text: str) -> dict[str, str]:
    """``key -> description`` of the help's option lines (``  key=VALUE   description``)."""
    section = help_text.split("== Options (key=value) ==", 1)[1].split("\n\n", 1)[0]
    return {match[1]: match[2] for line in section.splitlines() if (match := OPTION_LINE.match(line))}


def rendered(value: object) -> str:
    """A config value as the help writes its default."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def examples(help_text: str) -> list[list[str]]:
    """The example commands of the help's header (the lines that start with ``python -m``), as argv lists."""
    header = help_text.split("==", 1)[0]
    lines = [line.strip() for line in header.splitlines()]
    return [shlex.split(line)[3:] for line in lines if line.startswith("python -m tiny_decoder.")]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_names_the_tool_not_the_train_tool(helps, tool: str):
    result = helps[tool]
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith(f"tiny_decoder.{tool}: "), out[:300]
    assert f"Usage: python -m tiny_decoder.{tool} " in out
    assert "python -m tiny_decoder.train" not in out and "is powered by Hydra" not in out  # not train's header


@pytest.mark.parametrize("tool", TOOLS)
def test_help_lists_the_tools_own_options_with_their_real_defaults(helps, tool: str):
    listed = options(helps[tool].stdout)
    assert set(listed) >= OWN_OPTIONS[tool], sorted(OWN_OPTIONS[tool] - set(listed))
    cfg = tool_config(tool)
    for key in CHECKED_DEFAULTS[tool]:
        if OmegaConf.is_missing(cfg, key):
            assert "(required)" in listed[key], (key, listed[key])
            continue
        default = rendered(OmegaConf.select(cfg, key))
        assert re.search(rf"\(default {re.escape(default)}[):]", listed[key]), (key, default, listed[key])


@pytest.mark.parametrize("tool", ["generate", "evaluate"])
def test_generate_and_evaluate_list_every_key_of_their_config_and_no_training_group(helps, tool: str):
    out = helps[tool].stdout
    leaves = {
        path
        for path, value in flatten(OmegaConf.to_container(tool_config(tool), resolve=False))
        if path not in ("data._target_", "data.batch_size")  # how the tool builds the data, not an option
    }
    assert leaves == OWN_OPTIONS[tool] == set(options(out))
    assert "== Configuration groups ==" not in out
    for group in ("attention:", "positional:", "experiment:", "callbacks:"):
        assert group not in out


def flatten(node: object, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from flatten(value, f"{prefix}{key}.")
    else:
        yield prefix.removesuffix("."), node


def test_estimate_and_summary_list_their_options_before_the_recipes(helps):
    for tool in ("estimate", "summary"):
        out = helps[tool].stdout
        assert out.index("== Options (key=value) ==") < out.index("== Recipes and parts (group=option) ==")
        assert "experiment: " in out and "stories15m" in out


def substitute(arg: str, checkpoints: dict[str, Path] = CHECKPOINTS) -> str:
    for placeholder, checkpoint in checkpoints.items():
        arg = arg.replace(placeholder, str(checkpoint))
    return arg


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    """A small Llama-style language model (export's examples write it to both formats; GPT-2's v1_lm cannot go
    to llama2c)."""
    pytest.importorskip("transformers")
    from tests.interop.models import LLAMA, bpe_tokenizer, checkpoint

    return checkpoint(tmp_path_factory.mktemp("llama"), bpe_tokenizer(), "llama", **LLAMA)


def example_arguments(helps, tool: str, monkeypatch, llama_checkpoint: Path) -> list[list[str]]:
    """The help's examples as argv lists with the placeholders filled in. export: the language-model checkpoint
    is a Llama-style one; convert: its sources are what export's examples write (run first, here), its llama2.c
    model and tokenizer the exported ``model.bin`` and ``tokenizer.json``."""
    if tool not in ("export", "convert"):
        return [[substitute(arg) for arg in args] for args in examples(helps[tool].stdout)]
    checkpoints = {"outputs/lm/DATE/TIME/checkpoints/last.ckpt": llama_checkpoint}
    exports = [[substitute(arg, checkpoints) for arg in args] for args in examples(helps["export"].stdout)]
    if tool == "export":
        return exports
    for args in exports:
        assert run_tool(monkeypatch, "export", *args) == 0, args
    sources = {
        "stories15M.bin": Path("exported/llama2c/model.bin"),
        "tokenizer.model": Path("exported/llama2c/tokenizer.json"),
    }
    return [[substitute(arg, sources) for arg in args] for args in examples(helps[tool].stdout)]


@pytest.mark.parametrize("tool", TOOLS)
def test_the_usage_examples_of_the_help_run(helps, tool: str, tmp_path: Path, monkeypatch, capsys, request):
    """Every example the help prints runs (checkpoint placeholders -> the fixtures' small checkpoints; the
    files an example names are written into the working directory first)."""
    commands = examples(helps[tool].stdout)
    assert len(commands) == 2, helps[tool].stdout[:1000]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINY_DECODER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "valid.txt").write_text("Once upon a time there was a little cat. The cat liked to play.\n" * 20)
    passages = ["The cat sat on the mat and looked at the dog", "The sun was warm and the day was long"]
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in passages))
    llama = request.getfixturevalue("llama_checkpoint") if tool in ("export", "convert") else Path()
    for args in example_arguments(helps, tool, monkeypatch, llama):
        assert run_tool(monkeypatch, tool, *args) == 0, (args, capsys.readouterr())
        out = capsys.readouterr().out
        assert out.strip(), args
        if tool == "generate" and any(arg.startswith("sequence=") for arg in args):
            assert out.strip().splitlines()[-1].startswith("1 2 4 7 11 -> ")
        if tool == "evaluate":
            assert "loss" in out
        if tool == "summary" and "attention_png=attn.png" in args:
            assert (tmp_path / "attn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
