"""Generation throughput with and without the KV cache (issue 8, item 3).

    python benchmarks/generation.py [--shape stories15m] [--new 64 256 512] [--repeats 3]

Builds a randomly initialised model of a preset shape, decodes greedily at batch 1 from a 1-token prompt
(`max_new_tokens` = N, capped so the sequence stays inside the context) with `use_cache=True` and
`use_cache=False`, and prints one JSON line per setting plus a table: tokens/s (median of the repeats) and
the cache speedup. Random weights decode as fast as trained ones: the work per token is the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tiny_decoder.generation import generate
from tiny_decoder.model import DecoderTransformer, ModelConfig

SHAPES = {
    # llama2.c's stories15M shape with this repo's 4096-token BPE
    "stories15m": dict(vocab_size=4096, context_length=256, d_model=288, n_layers=6, n_heads=6, d_ff=768),
    "stories260k": dict(vocab_size=512, context_length=512, d_model=64, n_layers=5, n_heads=8, d_ff=172),
    "tiny": dict(vocab_size=256, context_length=128, d_model=32, n_layers=2, n_heads=4, d_ff=64),
}
LLAMA_PARTS = dict(
    bias=False,
    tie_embeddings=True,
    activation={"name": "swiglu"},
    norm={"placement": "pre", "kind": "rmsnorm", "eps": 1e-5, "affine": True},
    attention={"name": "sdpa"},
    positional={"name": "rope"},
)


def build_model(shape: str) -> DecoderTransformer:
    torch.manual_seed(0)
    return DecoderTransformer(ModelConfig(**SHAPES[shape], **LLAMA_PARTS)).eval()


def tokens_per_second(model: DecoderTransformer, new_tokens: int, use_cache: bool, repeats: int) -> float:
    prompt = torch.zeros(1, 1, dtype=torch.long)
    generate(model, prompt, 8, use_cache=use_cache)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(model, prompt, new_tokens, use_cache=use_cache)
        rates.append((out.shape[1] - 1) / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="stories15m")
    parser.add_argument("--new", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model = build_model(args.shape)
    rows = []
    for new_tokens in args.new:
        cached = tokens_per_second(model, new_tokens, True, args.repeats)
        recomputed = tokens_per_second(model, new_tokens, False, args.repeats)
        row = {
            "benchmark": "generation",
            "shape": args.shape,
            "new_tokens": new_tokens,
            "context": model.config.context_length,
            "threads": torch.get_num_threads(),
            "cached_tokens_per_s": round(cached, 1),
            "recomputed_tokens_per_s": round(recomputed, 1),
            "cache_speedup": round(cached / recomputed, 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'new tokens':>10} {'cached tok/s':>13} {'recompute tok/s':>16} {'speedup':>8}")
    for row in rows:
        print(
            f"{row['new_tokens']:>10} {row['cached_tokens_per_s']:>13} {row['recomputed_tokens_per_s']:>16} "
            f"{row['cache_speedup']:>8}"
        )
    return rows


if __name__ == "__main__":
    main()
