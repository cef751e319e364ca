"""Every multirun command of README.md runs as written, from a fresh working directory with no
``hydra.sweep.dir`` given (as a new user runs it), shortened only by overrides that cut its budget
(``debug=fast``, fewer Optuna trials). The SLURM commands cannot submit here: their launcher config is
resolved instead (sweep directory and submitit folder), which is where the multirun used to fail."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, run_module

README = REPO_ROOT / "README.md"
# what makes each README command take seconds: one batch per job, two Optuna trials
SHORTEN = ["debug=fast", "logger=csv"]
SHORTEN_OPTUNA = ["hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2"]


def readme_commands() -> list[list[str]]:
    """The ``python -m tiny_decoder.train`` command lines of README's bash blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line.split("#", 1)[0]) for line in lines if "tiny_decoder.train" in line]
    return [words[words.index("python") :] for words in commands if "python" in words]


def is_multirun(words: list[str]) -> bool:
    return "-m" in words[3:] or any(word.startswith("hparams_search=") for word in words)


MULTIRUN_COMMANDS = [words for words in readme_commands() if is_multirun(words)]
LOCAL = [words for words in MULTIRUN_COMMANDS if not any("slurm" in word for word in words)]
SLURM = [words for words in MULTIRUN_COMMANDS if any("slurm" in word for word in words)]


def run(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A README command line (``python -m MODULE ARGS``) run from ``cwd``."""
    return run_module(words[2], *words[3:], timeout=300, cwd=cwd)


def test_the_readme_has_the_multirun_commands_this_file_runs() -> None:
    assert len(LOCAL) >= 3 and len(SLURM) >= 2, MULTIRUN_COMMANDS
    assert any("hydra/launcher=joblib" in words for words in LOCAL)
    assert any(word.startswith("hparams_search=") for words in LOCAL for word in words)


@pytest.mark.slow  # processes / compilation: tens of seconds (CI runs -m slow too)
@pytest.mark.parametrize("words", LOCAL, ids=[" ".join(words[3:]) for words in LOCAL])
def test_readme_multirun_runs_as_written(words: list[str], tmp_path: Path) -> None:
    optuna = any(word.startswith("hparams_search=") for word in words)
    result = run([*words, *SHORTEN, *(SHORTEN_OPTUNA if optuna else [])], tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    sweeps = list((tmp_path / "multirun").glob("*/*/*"))
    assert len(sweeps) == 1, sweeps
    task = sweeps[0].parents[1].name
    assert task == ("lm" if "stories" in " ".join(words) else "sequence")
    jobs = sorted(path.parent for path in sweeps[0].glob("*/results.json"))
    expected = 2 if optuna else count_jobs(words)
    assert [job.name for job in jobs] == [str(n) for n in range(expected)]
    assert not list(sweeps[0].rglob("error.txt"))


def count_jobs(words: list[str]) -> int:
    """The number of jobs of a basic sweep: the product of the comma lists' lengths."""
    jobs = 1
    for word in words:
        if "=" in word and "," in word.split("=", 1)[1]:
            jobs *= len(word.split("=", 1)[1].split(","))
    return jobs


@pytest.mark.parametrize("words", SLURM, ids=[" ".join(words[3:6]) for words in SLURM])
def test_readme_slurm_multirun_resolves_its_launcher(words: list[str], tmp_path: Path) -> None:
    # --cfg prints the config of the sweep's first job and runs nothing (a sweep list: its first value)
    composed = words[:3] + [re.sub(r"=([^,]*),.*", r"=\1", word) for word in words[3:] if word != "-m"]
    result = run([*composed, "hydra.mode=MULTIRUN", "--cfg", "hydra", "--resolve"], tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert re.search(r"submitit_folder: multirun/lm/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d/\.submitit/%j", result.stdout)
