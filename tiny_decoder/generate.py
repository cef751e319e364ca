"""``python -m tiny_decoder.generate ckpt=PATH ...``: decode from a trained checkpoint with the KV cache.

Sequence task: ``sequence="1 2 4 7 11" steps=5`` prints the greedy continuation. Language model:
``prompt="Once upon a time" temperature=0.8 top_k=50`` prints sampled stories. Each task implements
``generate_outputs(GenerationRequest) -> list[str]``; this module loads the checkpoint, types the options and
prints.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig

from tiny_decoder.cli import hydra_tool, typed_request
from tiny_decoder.tasks import load_task
from tiny_decoder.tasks.base import GenerationRequest


def generate_from_checkpoint(cfg: DictConfig) -> list[str]:
    """Load ``cfg.ckpt``, print what its task generates for the options; the time it took on stderr."""
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.ckpt, map_location=cfg.device)
    request = typed_request(cfg, GenerationRequest)
    started = time.perf_counter()
    outputs = task.generate_outputs(request)
    seconds = time.perf_counter() - started
    for text in outputs:
        print(text)
    print(f"{len(outputs)} output(s) in {seconds:.2f} s{speed(task, request, outputs, seconds)}", file=sys.stderr)
    return outputs


def speed(task: Any, request: GenerationRequest, outputs: list[str], seconds: float) -> str:
    """``, N tokens/s`` over the new tokens (the continuations re-encoded by the task's tokenizer, or the numbers
    of a sequence task), compilation included; empty when it cannot be counted."""
    if request.sequence:
        tokens = request.steps * len(outputs)
    elif getattr(task, "tokenizer", None) is not None and request.prompt is not None:
        prompt_tokens = len(task.encode(request.prompt))
        tokens = sum(max(len(task.encode(text)) - prompt_tokens, 0) for text in outputs)
    else:
        return ""
    return f", {tokens / seconds:.0f} new tokens/s" if seconds > 0 and tokens else ""


main = hydra_tool("generate", generate_from_checkpoint)

if __name__ == "__main__":
    main()
