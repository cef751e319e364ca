"""What the benchmark scripts share: the machine they ran on, the recipes' real configs, measured matmul FLOP/s,
JSON lines and tables.

Every script prints one JSON object per measurement (``{"benchmark": ..., ...}``) and a table at the end;
``run_all.py`` collects the lines of all of them. Models are built from the same Hydra configs as
``python -m tiny_decoder.train +experiment=NAME`` (``recipe_config``), so a benchmark measures what users train.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from tiny_decoder.model import ModelConfig
from tiny_decoder.training.throughput import matmul_seconds

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
# the offline TinyStories text beside the repository (tests and CPU runs read it from there)
SHARED_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_3000.txt"
# shrinks any recipe to a model that builds and runs in a second (the scripts' --smoke runs)
SMOKE_OVERRIDES = (
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=64",
    "data.vocab_size=300",
    "data.context_length=32",
)


def machine() -> dict[str, Any]:
    """CPU model, cores, accelerator, torch version and threads: printed with every run's figures."""
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def recipe_config(experiment: str, overrides: Iterable[str] = ()) -> DictConfig:
    """The composed ``train`` config of ``+experiment=<experiment>`` with ``overrides``, outputs in a temp dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={experiment}", *overrides])
    GlobalHydra.instance().clear()
    with open_dict(cfg):  # paths.* use ${hydra:...}, unset outside a Hydra run
        cfg.paths.output_dir = str(Path(os.environ.get("TMPDIR", "/tmp")) / "tiny_decoder_benchmarks")
        cfg.paths.resume_dir = cfg.paths.output_dir
    return cfg


def recipe_model_config(experiment: str, overrides: Iterable[str] = ()) -> ModelConfig:
    """The recipe's model, with vocabulary and context from its data config (what training would build)."""
    cfg = recipe_config(experiment, overrides)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["vocab_size"] = model.get("vocab_size") or int(cfg.data.vocab_size)
    model["context_length"] = model.get("context_length") or int(cfg.data.context_length)
    return ModelConfig.from_dict(model)


def matmul_flops(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> tuple[float, float]:
    """Measured FLOP/s of a ``size`` x ``size`` matrix product in ``dtype`` on this machine over ``seconds`` of
    back-to-back products: the median (a sustained rate, like the training figures it is compared with) and
    the best single product."""
    times = matmul_seconds(dtype, size, seconds, device().type, minimum=5)
    return 2 * size**3 / median(times), 2 * size**3 / min(times)


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def emit(row: dict[str, Any]) -> dict[str, Any]:
    """Print one measurement as a JSON line (and return it)."""
    print(json.dumps(row), flush=True)
    return row


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table of ``rows`` with ``(key, header)`` columns (missing values blank)."""
    cells = [[header for _, header in columns]]
    cells += [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(line, widths, strict=True)) for line in cells)


def cell(value: Any) -> str:
    """A figure as printed in tables: 3 significant digits below 10, thousands separators above."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)
