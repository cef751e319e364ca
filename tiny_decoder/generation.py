"""Autoregressive decoding with the KV cache: greedy, temperature, top-k and top-p sampling.

The model always sees at most its last ``context_length`` tokens (nanoGPT's crop). While the sequence
fits, each step feeds only the newest token through the cache; once it overflows, each step re-encodes
the cropped window (positions restart at 0, as in training).
"""

from __future__ import annotations

import torch

from tiny_decoder.model.cache import KVCache
from tiny_decoder.model.transformer import DecoderTransformer


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row, set the rest to ``-inf``."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability mass reaches ``p``."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= p  # mass before this token already >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def select_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` token ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: DecoderTransformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue ``prompt`` ``(B, T)`` by up to ``max_new_tokens``; returns ``(B, T + n)``.

    Rows that emitted ``eos_id`` keep emitting it; decoding stops once every row has.
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (batch, length>0) token ids, got shape {tuple(prompt.shape)}")
    was_training = model.training
    model.eval()
    context = model.config.context_length
    tokens = prompt
    cache: KVCache | None = model.new_cache(prompt.shape[0]) if use_cache else None
    logits = _step(model, tokens, cache, context, fed=0)
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        next_token = select_next_token(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_token = next_token.masked_fill(finished, eos_id)
            finished |= next_token == eos_id
        tokens = torch.cat([tokens, next_token.unsqueeze(1)], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
        logits = _step(model, tokens, cache, context, fed=tokens.shape[1] - 1)
    model.train(was_training)
    return tokens


def _step(
    model: DecoderTransformer, tokens: torch.Tensor, cache: KVCache | None, context: int, fed: int
) -> torch.Tensor:
    """Logits for the last position; ``fed`` tokens are already in the cache."""
    if cache is not None and tokens.shape[1] <= context:
        return model(tokens[:, fed:], cache)
    return model(tokens[:, -context:])
