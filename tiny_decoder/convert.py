"""``python -m tiny_decoder.convert src=PATH out=FILE.ckpt [tokenizer=PATH]``: a model from the ecosystem as a
checkpoint of this project (a language model with its tokenizer, weights only).

Sources: a Hugging Face folder of a ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` (its own tokenizer), a llama2.c
``model.bin`` (version 0 or 1) or training ``ckpt.pt`` with ``tokenizer=`` its SentencePiece ``tokenizer.model``
(or a ``tokenizer.json``). llama2.c models start and end every story with BOS (``<s>``), which becomes the
task's end-of-text token. The checkpoint is written under a temporary name and renamed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tokenizers import Tokenizer

from tiny_decoder.cli import hydra_tool
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.interop import hf, llama2c
from tiny_decoder.interop.llama import llama_model
from tiny_decoder.interop.spm_tokenizer import sentencepiece_tokenizer, special_piece
from tiny_decoder.model.transformer import DecoderTransformer
from tiny_decoder.tasks.checkpoint import save_weights_checkpoint
from tiny_decoder.tasks.language_model import LanguageModel

LLAMA2C_BOS = "<s>"


def from_hf_folder(folder: Path, tokenizer_path: str | None) -> tuple[DecoderTransformer, Tokenizer, str, str]:
    transformers = hf.transformers_module()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"src={folder}: a folder without config.json is not a Hugging Face model")
    model = hf.from_hf(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32"))
    if tokenizer_path is not None:
        tokenizer, eot = read_tokenizer(tokenizer_path)
        return model, tokenizer, eot, eot
    try:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ConfigError(f"src={folder}: no tokenizer files there; give tokenizer=PATH") from error
    end = hf_tokenizer.eos_token or hf_tokenizer.bos_token
    start = hf_tokenizer.bos_token or end
    if end is None:
        raise ConfigError(f"src={folder}: its tokenizer names no eos or bos token, which this project needs")
    return model, hf_tokenizer.backend_tokenizer, end, start


def read_tokenizer(path: str) -> tuple[Tokenizer, str]:
    """A SentencePiece ``.model`` (end token: its BOS, as llama2.c uses it) or a ``tokenizer.json``."""
    if not Path(path).is_file():
        raise ConfigError(f"tokenizer={path}: no such file")
    if path.endswith(".json"):
        tokenizer = Tokenizer.from_file(path)
        eot = LLAMA2C_BOS if tokenizer.token_to_id(LLAMA2C_BOS) is not None else "<|endoftext|>"
        return tokenizer, eot
    return sentencepiece_tokenizer(path), special_piece(path, "bos")


def from_llama2c(path: Path, tokenizer_path: str | None) -> tuple[DecoderTransformer, Tokenizer, str, str]:
    tokenizer_path = tokenizer_path or _sibling_tokenizer(path)
    if tokenizer_path is None:
        raise ConfigError(
            f"src={path}: llama2.c files carry no tokenizer and none lies beside it; give tokenizer=PATH (its "
            "tokenizer.model: llama2.c's for stories15M/42M/110M, tok512.model for stories260K)"
        )
    shape, weights = llama2c.read_checkpoint_pt(path) if path.suffix == ".pt" else llama2c.read_model_bin(path)[:2]
    tokenizer, eot = read_tokenizer(tokenizer_path)
    if tokenizer.get_vocab_size() > shape.vocab_size:
        raise ConfigError(
            f"tokenizer={tokenizer_path} has {tokenizer.get_vocab_size()} tokens, the model only {shape.vocab_size}: "
            "it is another model's tokenizer"
        )
    return llama_model(shape, weights), tokenizer, eot, eot


def _sibling_tokenizer(path: Path) -> str | None:
    """``tokenizer.json`` (what ``export format=llama2c`` writes) or ``tokenizer.model`` beside ``path``."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path.parent / name).is_file():
            return str(path.parent / name)
    return None


def imported_task(model: DecoderTransformer, tokenizer: Tokenizer, eot: str, start: str) -> LanguageModel:
    """A language-model task holding ``model`` and ``tokenizer``; prompts start with ``start``, texts end at
    ``eot``."""
    for token in {eot, start}:
        if tokenizer.token_to_id(token) is None:
            raise ConfigError(f"the tokenizer has no {token!r} token")
    task = LanguageModel(
        model=model.config.to_dict(),
        prepend_eot=True,
        eot_token=eot,
        start_token=None if start == eot else start,
    )
    task.model.load_state_dict(model.state_dict())
    task.use_tokenizer(tokenizer)
    return task.eval()


def convert(cfg: DictConfig) -> Path:
    started = time.perf_counter()
    src, out = Path(cfg.src), Path(cfg.out)
    if out.exists():
        raise ConfigError(f"out={out} exists: choose a new file (convert never overwrites)")
    if src.is_dir():
        parts = from_hf_folder(src, cfg.tokenizer)
    elif src.is_file():
        parts = from_llama2c(src, cfg.tokenizer)
    else:
        raise ConfigError(f"src={src}: no such file or folder")
    task = imported_task(*parts)
    save_weights_checkpoint(task, out)
    print(f"wrote {out} ({_describe(task)}) in {time.perf_counter() - started:.1f} s")
    return out


def _describe(task: Any) -> str:
    config = task.model_config
    return (
        f"d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} heads, vocab {config.vocab_size}, "
        f"{task.model.num_parameters() / 1e6:.2f} M parameters"
    )


main = hydra_tool("convert", convert)

if __name__ == "__main__":
    main()
