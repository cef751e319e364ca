"""Small models, tokenizers and checkpoints the interop tests build themselves (no downloads): a byte-level
BPE trained on the shared stories, Llama- and GPT-2-style language models with random (not initial) weights,
and a reference of llama2.c's own forward pass (its ``model.py``: interleaved RoPE, grouped-query attention),
written from its equations so that the import is checked against llama2.c's definition, not against itself."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from tests.helpers import SHARED_DATA
from tiny_decoder.data.tokenizer import train_bpe
from tiny_decoder.tasks.checkpoint import save_weights_checkpoint
from tiny_decoder.tasks.language_model import LanguageModel

STORIES = SHARED_DATA / "tinystories" / "tinystories_3000.txt"
VOCAB = 320
RMS = {"placement": "pre", "kind": "rmsnorm", "eps": 1e-5, "affine": True}
LLAMA = {"n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 96, "bias": False, "activation": {"name": "swiglu"},
         "norm": RMS, "positional": {"name": "rope"}}  # fmt: skip
GPT2 = {"n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 128, "bias": True, "activation": {"name": "gelu"},
        "positional": {"name": "learned"}}  # fmt: skip


def story_texts(limit: int = 400) -> list[str]:
    return STORIES.read_text(encoding="utf-8").split("<|endoftext|>")[:limit]


def bpe_tokenizer() -> Tokenizer:
    return train_bpe(story_texts(), VOCAB)


def language_model(tokenizer: Tokenizer, seed: int = 0, context: int = 48, **model: object) -> LanguageModel:
    """A language-model task of the given model options with weights moved off their init (biases and norm
    weights too, so that a dropped or misplaced tensor shows in the logits)."""
    torch.manual_seed(seed)
    task = LanguageModel(model={"vocab_size": VOCAB, "context_length": context, **model}, prepend_eot=True)
    with torch.no_grad():
        for parameter in task.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    task.use_tokenizer(tokenizer)
    return task.eval()


def checkpoint(tmp_path: Path, tokenizer: Tokenizer, name: str = "model", **model: object) -> Path:
    return save_weights_checkpoint(language_model(tokenizer, **model), tmp_path / f"{name}.ckpt")


# ------------------------------------------------------------------ llama2.c's model.py, from its equations


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_interleaved(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """llama2.c's apply_rotary_emb: consecutive pairs (2j, 2j+1) as complex numbers times e^(i pos freq_j)."""
    _, length, _, head_dim = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length).float(), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)  # (T, D/2)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation[None, :, None, :]).flatten(3)


def llama2c_logits(weights: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv_heads: int,
                   ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Logits of llama2.c's Transformer with ``weights`` (its state-dict names, interleaved q / k rows)."""
    x = weights["tok_embeddings.weight"][ids]
    batch, length, dim = x.shape
    head_dim = dim // n_heads
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(n_layers):
        w = {name.removeprefix(f"layers.{i}."): value for name, value in weights.items()}
        h = _rms(x, w["attention_norm.weight"])
        q = (h @ w["attention.wq.weight"].T).view(batch, length, n_heads, head_dim)
        k = (h @ w["attention.wk.weight"].T).view(batch, length, n_kv_heads, head_dim)
        v = (h @ w["attention.wv.weight"].T).view(batch, length, n_kv_heads, head_dim)
        q, k = _rope_interleaved(q), _rope_interleaved(k)
        k, v = (t.repeat_interleave(n_heads // n_kv_heads, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim) + mask
        out = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, length, dim)
        x = x + out @ w["attention.wo.weight"].T
        h = _rms(x, w["ffn_norm.weight"])
        x = (
            x
            + (F.silu(h @ w["feed_forward.w1.weight"].T) * (h @ w["feed_forward.w3.weight"].T))
            @ w["feed_forward.w2.weight"].T
        )
    x = _rms(x, weights["norm.weight"])
    return x @ weights.get("output.weight", weights["tok_embeddings.weight"]).T


def llama2c_state(n_layers: int, dim: int, hidden: int, n_heads: int, n_kv_heads: int, vocab: int,
                  seed: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """Random weights under llama2.c's names (untied head)."""
    generator = torch.Generator().manual_seed(seed)
    kv_dim = dim // n_heads * n_kv_heads

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    state = {"tok_embeddings.weight": rand(vocab, dim), "norm.weight": 1 + rand(dim), "output.weight": rand(vocab, dim)}
    for i in range(n_layers):
        shapes = {"attention.wq": (dim, dim), "attention.wk": (kv_dim, dim), "attention.wv": (kv_dim, dim),
                  "attention.wo": (dim, dim), "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden),
                  "feed_forward.w3": (hidden, dim)}  # fmt: skip
        state.update({f"layers.{i}.{name}.weight": rand(*shape) for name, shape in shapes.items()})
        state[f"layers.{i}.attention_norm.weight"] = 1 + rand(dim)
        state[f"layers.{i}.ffn_norm.weight"] = 1 + rand(dim)
    return state
