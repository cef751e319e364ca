"""Peak memory of one training batch of every recipe, measured against ``python -m tiny_decoder.estimate``.

    python benchmarks/memory.py                          # every recipe of conf/experiment/ (~10 min on 2 cores)
    python benchmarks/memory.py --experiment stories260k shakespeare_char --override shrink_batch_to_gb=null

For each recipe of ``conf/experiment/`` (not ``base/``), in a subprocess of its own:
``python -m tiny_decoder.train +experiment=NAME debug=fast`` (one training, validation and test batch, no
checkpoints or logs), the language-model recipes on the shared offline text (``../shared/data``: TinyStories'
train head + 3,000 stories and its validation head; Tiny Shakespeare's ``input.txt``), the sequence recipes on
their generated data. The measured figure is the child's peak resident set size (``ru_maxrss`` of that process,
started by a small launcher: everything it ever held at once, Python, torch and Lightning included).

The estimate is the ``estimate`` tool's (``tiny_decoder.run.memory.estimate_run`` of the same composed config,
the batch ``debug=fast`` trains: ``shrink_batch_to_gb``, in the recipe's precision), whose total is of the whole
process: it adds a framework baseline (``FRAMEWORK_BYTES``, plus ``TEXT_DATA_BYTES`` for text data) to the
training step, so the two columns compare like with like (the comparison is of totals, not of the step's
increment). A first run on a cold cache (``TINY_DECODER_CACHE``) also trains the tokenizer and tokenizes the
text inside the measured process; with a warm cache only the step is left.

One JSON line per recipe, then a table: recipe, precision, batch, measured and estimated MiB, their ratio,
whether the estimate is within +-30% and whether the peak is at most 4 GB (3,815 MiB: the first-run target of
``debug=fast`` on a 2-core, no-GPU machine).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

from benchkit import CONF_DIR, REPO_ROOT, emit, machine, recipe_config, table
from hydra.utils import instantiate

from tiny_decoder.model import ModelConfig
from tiny_decoder.run.config_checks import build_model_config
from tiny_decoder.run.memory import MIB, TEXT_DATA_MODULE, estimate_run, shrink_batch

SHARED = REPO_ROOT.parent / "shared" / "data"
TINYSTORIES = SHARED / "tinystories"
STORIES_FILES = (
    f"data.files.train=[{TINYSTORIES / 'tinystories_v2_train_head.txt'},{TINYSTORIES / 'tinystories_3000.txt'}]",
    f"data.files.validation={TINYSTORIES / 'tinystories_valid_head.txt'}",
)
SHAKESPEARE_FILES = (f"data.files.train={SHARED / 'shakespeare' / 'input.txt'}",)
LIMIT_MIB = 4e9 / 2**20  # the target: one debug=fast batch of every recipe in 4 GB (3,815 MiB)
TOLERANCE = 0.30  # the estimate within +-30% of the measured peak


def recipes() -> list[str]:
    """Every recipe of conf/experiment/ (the shared bases under base/ are not recipes)."""
    return sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


def data_overrides(experiment: str) -> tuple[str, ...]:
    """The shared offline files a language-model recipe reads (none for the sequence recipes)."""
    cfg = recipe_config(experiment)
    if cfg.data.get("_target_") != TEXT_DATA_MODULE:
        return ()
    return SHAKESPEARE_FILES if cfg.data.get("text_format") == "plain" else STORIES_FILES


# a small launcher process runs the command and prints its peak: Linux keeps a process's RSS high-water mark across
# exec, so a child forked straight from this process (torch loaded: ~400 MB) could never report less than that
LAUNCHER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(f'peak_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); sys.exit(code)"
)


def child_peak(command: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """Run ``command``; its exit code, peak RSS in MiB (``ru_maxrss`` of that process alone, started by a small
    launcher), wall seconds and output."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    output, _, peak = result.stdout.rpartition("peak_kib=")
    return result.returncode, int(peak) / 1024, time.perf_counter() - started, output


def estimate_of(experiment: str, overrides: list[str]) -> tuple[Any, int]:
    """The estimate of the composed ``train`` config (the batch after ``shrink_batch_to_gb``) and that batch."""
    cfg = recipe_config(experiment, overrides)
    datamodule = instantiate(cfg.data, _convert_="all")
    config = ModelConfig.from_dict(build_model_config(cfg, datamodule))
    batch = shrink_batch(cfg, config)
    return estimate_run(cfg, config), batch


def measure(experiment: str, extra: list[str]) -> dict[str, Any]:
    overrides = ["debug=fast", *data_overrides(experiment), *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "tiny_decoder.train", f"+experiment={experiment}", *overrides]
    code, peak, wall, output = child_peak(command, env)
    if code:
        print(output[-3000:], file=sys.stderr)
        raise SystemExit(f"{experiment}: training exited with {code}")
    estimate, batch = estimate_of(experiment, overrides)
    estimated = estimate.total_bytes / MIB
    ratio = estimated / peak
    return emit({
        "benchmark": "memory", "experiment": experiment, "precision": estimate.precision.name, "batch_size": batch,
        "measured_mib": round(peak), "estimated_mib": round(estimated), "ratio": round(ratio, 3),
        "within_30pct": abs(ratio - 1) <= TOLERANCE, "within_4gb": peak <= LIMIT_MIB,
        "step_estimate_mib": round(estimate.step_bytes / MIB), "wall_s": round(wall, 1),
        "shrunk": "data.batch_size" in output and "->" in output, "overrides": " ".join(extra),
    })  # fmt: skip


COLUMNS = [
    ("experiment", "recipe"), ("precision", "precision"), ("batch_size", "batch"),
    ("measured_mib", "peak RSS MiB"), ("estimated_mib", "estimate MiB"), ("ratio", "estimate/peak"),
    ("within_30pct", "within 30%"), ("within_4gb", "<= 4 GB"), ("wall_s", "wall s"),
]  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", nargs="+", default=recipes(), help="recipes (default: all)")
    parser.add_argument("--override", nargs="*", default=[], help="extra overrides for every run")
    args = parser.parse_args(argv)
    if not TINYSTORIES.is_dir():
        raise SystemExit(f"the language-model recipes read {SHARED} (the shared offline data beside the repository)")
    emit({"benchmark": "machine", **machine()})
    rows = [measure(experiment, list(args.override)) for experiment in args.experiment]
    print("\n" + table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
