"""``python -m tiny_decoder.evaluate ckpt=PATH ...``: metrics of a trained checkpoint, as a table (and JSON).

Language model: loss, perplexity and bits per byte on each split given in ``data.files`` (tokenized with
the tokenizer stored in the checkpoint), and LAMBADA last-word accuracy / loss with ``lambada=PATH``.
Sequence predictor: accuracy, acc_last, mean absolute distance and per-phase accuracy on ``n`` fresh
sequences drawn from ``seed``. Each task implements ``evaluate_outputs(EvaluationRequest) -> dict[str, float]``;
this module loads the checkpoint, types the options, prints the table and writes ``output=PATH`` as JSON.
``harness_tasks=[NAME,...]`` adds lm-evaluation-harness tasks on a language model (``tiny_decoder.harness``; the
``eval`` extra), e.g. ``lambada_shared``: lm_eval's LAMBADA over the ``lambada=`` file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from tiny_decoder.cli import hydra_tool, typed_request
from tiny_decoder.tasks import load_task
from tiny_decoder.tasks.base import EvaluationRequest


def format_table(results: dict[str, float]) -> str:
    """``metric  value`` lines: names left-aligned, values right-aligned."""
    values = {name: format_value(value) for name, value in results.items()}
    name_width = max([len("metric"), *map(len, values)])
    value_width = max([len("value"), *map(len, values.values())])
    lines = [f"{'metric':<{name_width}}  {'value':>{value_width}}", f"{'-' * name_width}  {'-' * value_width}"]
    lines += [f"{name:<{name_width}}  {value:>{value_width}}" for name, value in values.items()]
    return "\n".join(lines)


def format_value(value: float) -> str:
    """Counts as integers, large or tiny values in scientific notation, the rest with 4 decimals."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if math.isfinite(value) and value != 0 and not 1e-3 <= abs(value) < 1e6:
        return f"{value:.4e}"
    return f"{value:.4f}"


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def evaluation_request(cfg: DictConfig) -> EvaluationRequest:
    """The tool's options, typed; ``data`` becomes a data module factory when it names any file or dataset."""
    data = cfg.get("data")
    wanted = data is not None and (any((data.get("files") or {}).values()) or data.get("hub_dataset"))
    factory = instantiate(data, _partial_=True, _convert_="all") if wanted else None  # called by the task
    tokenizer_path = data.get("tokenizer_path") if data is not None else None
    return typed_request(cfg, EvaluationRequest, text_data=factory, tokenizer_path=tokenizer_path)


def task_results(task: Any, request: EvaluationRequest) -> dict[str, float]:
    """The task's own metrics, then those of ``request.harness_tasks`` (with harness tasks, the language model's
    own only when text data or LAMBADA is asked for too)."""
    if not request.harness_tasks:
        return task.evaluate_outputs(request)
    from tiny_decoder import harness  # lm_eval: the optional eval extra

    lm = harness.task_lm(task, request.batch_size)  # a missing lm_eval or a sequence task fails before any work
    own = task.evaluate_outputs(request) if request.text_data is not None or request.lambada else {}
    return {**own, **harness.harness_results(lm, request.harness_tasks, request.harness_limit, request.lambada)}


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Load ``cfg.ckpt``, run its task's ``evaluate_outputs``, print the table; write JSON when ``cfg.output``."""
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.ckpt, map_location=cfg.device)
    results = task_results(task, evaluation_request(cfg))
    print(format_table(results))
    if cfg.get("output"):
        payload = {"checkpoint": str(cfg.ckpt), "task": task.task_name, "metrics": results}
        print(f"results written to {write_json(cfg.output, payload)}")
    return results


main = hydra_tool("evaluate", evaluate_checkpoint)

if __name__ == "__main__":
    main()
