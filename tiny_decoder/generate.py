"""``python -m tiny_decoder.generate ckpt=PATH ...``: decode from a trained checkpoint with the KV cache.

Sequence task: ``sequence="1 2 4 7 11" steps=5`` prints the greedy continuation. Language model:
``prompt="Once upon a time" temperature=0.8 top_k=50`` prints sampled stories. Each task implements
``generate_outputs(GenerationRequest) -> list[str]``; this module loads the checkpoint, types the options and
prints.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from tiny_decoder.cli import hydra_tool, typed_request
from tiny_decoder.tasks import load_task
from tiny_decoder.tasks.base import GenerationRequest


def generate_from_checkpoint(cfg: DictConfig) -> list[str]:
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.ckpt, map_location=cfg.device)
    outputs = task.generate_outputs(typed_request(cfg, GenerationRequest))
    for text in outputs:
        print(text)
    return outputs


main = hydra_tool("generate", generate_from_checkpoint)

if __name__ == "__main__":
    main()
