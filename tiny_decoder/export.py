"""``python -m tiny_decoder.export ckpt=PATH format=hf|llama2c out=DIR``: a trained language model in the
ecosystem's formats.

``hf``: a ``save_pretrained`` folder (``config.json``, ``model.safetensors``, ``generation_config.json``) of a
``LlamaForCausalLM`` or ``GPT2LMHeadModel`` and the checkpoint's tokenizer as a ``PreTrainedTokenizerFast``
(``AutoTokenizer`` loads it). ``llama2c``: ``model.bin`` (``version=0``: what ``run.c`` reads) and
``tokenizer.bin``, with the end-of-text token moved to ``run.c``'s BOS id 1 (and ``tokenizer.json``, the
checkpoint's tokenizer in that order, which ``convert`` reads back). The folder is written under a
temporary name and renamed when complete: a failed export leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tiny_decoder.cli import hydra_tool
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.interop import hf, llama2c
from tiny_decoder.interop.llama import llama_weights
from tiny_decoder.tasks import load_task


def language_model(path: str) -> Any:
    task = load_task(path)
    if getattr(task, "_tokenizer", None) is None:
        raise ConfigError(
            f"ckpt={path}: this checkpoint has no tokenizer (a sequence-task model, or a language "
            "model saved before training started); only language models with their tokenizer export"
        )
    return task


def write_hf(task: Any, folder: Path) -> None:
    transformers = hf.transformers_module()
    hf.to_hf(task.model, task.eot_id).save_pretrained(folder)
    eot = task.tokenizer.id_to_token(task.eot_id)
    start = task.tokenizer.id_to_token(task.start_id)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=task.tokenizer, bos_token=start, eos_token=eot)
    tokenizer.save_pretrained(folder)


def write_llama2c(task: Any, folder: Path, version: int) -> None:
    shape, weights = llama_weights(task.model, "llama2c")
    llama2c.check_run_c_shape(shape)
    order = llama2c.bos_first_order(shape.vocab_size, task.start_id)
    llama2c.write_model_bin(folder / "model.bin", shape, llama2c.reorder_vocabulary(shape, weights, order), version)
    pieces = _padded(llama2c.token_pieces(task.tokenizer), shape.vocab_size, b"")
    scores = _padded(llama2c.merge_scores(task.tokenizer), shape.vocab_size, 0.0)
    llama2c.write_tokenizer_bin(folder / "tokenizer.bin", [pieces[i] for i in order], [scores[i] for i in order])
    tokenizer = llama2c.reorder_tokenizer(task.tokenizer, order[: task.tokenizer.get_vocab_size()])
    tokenizer.save(str(folder / "tokenizer.json"))


def _padded(values: list, size: int, fill: Any) -> list:
    """``values`` for every id of a model whose vocabulary is larger than its tokenizer's (ids never produced)."""
    return values + [fill] * (size - len(values))


def write_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder beside ``out``, then rename it to ``out``."""
    if out.exists():
        raise ConfigError(f"out={out} exists: choose a new folder (an export never overwrites)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export(cfg: DictConfig) -> Path:
    started = time.perf_counter()
    writers: dict[str, Callable[[Any, Path], None]] = {
        "hf": write_hf,
        "llama2c": lambda task, folder: write_llama2c(task, folder, int(cfg.version)),
    }
    if cfg.format not in writers:
        raise ConfigError(f"format={cfg.format}: choose one of {', '.join(writers)}")
    task = language_model(cfg.ckpt)
    out = write_atomically(Path(cfg.out), lambda folder: writers[cfg.format](task, folder))
    files = ", ".join(sorted(path.name for path in out.iterdir()))
    print(f"wrote {out} ({files}) in {time.perf_counter() - started:.1f} s")
    return out


main = hydra_tool("export", export)

if __name__ == "__main__":
    main()
