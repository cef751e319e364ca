"""Generation throughput: recomputation vs the KV cache, eager and compiled.

    python benchmarks/generation.py [--experiment stories15m] [--new 64 256 512] [--batch 1] [--repeats 3]

Builds the recipe's model (``+experiment=NAME``: the stories15M shape is d 288, 6 layers, 6 heads, SwiGLU 768,
RoPE, context 256, vocabulary 4096) with random weights (the work per token does not depend on them) and
decodes greedily from a 1-token prompt in three ways (``tiny_decoder.model.generation.generate``):

- ``recompute``: no cache, the whole (cropped) sequence every step (``use_cache=False``);
- ``cached``: the eager KV cache (the default);
- ``compiled``: the static KV cache and the compiled one-token step (``compile=True``); its compilation is
  timed apart (``compile_s``) and not counted in tokens/s.

One JSON line per length (median tokens/s of ``--repeats`` runs, speedups over ``recompute``), then a table.
Past the context (512 new tokens with a 256-token context) every mode recomputes the cropped window.
"""

from __future__ import annotations

import argparse
import time

import torch
from benchkit import SMOKE_OVERRIDES, device, emit, machine, median, recipe_model_config, table, timed

from tiny_decoder.model import DecoderTransformer
from tiny_decoder.model.generation import generate

MODES = {"recompute": {"use_cache": False}, "cached": {}, "compiled": {"compile": True}}


def build_model(experiment: str, overrides: list[str]) -> DecoderTransformer:
    torch.manual_seed(0)
    return DecoderTransformer(recipe_model_config(experiment, overrides)).to(device()).eval()


def tokens_per_second(model: DecoderTransformer, prompt: torch.Tensor, new_tokens: int, mode: str, repeats: int):
    times = timed(lambda: generate(model, prompt, new_tokens, **MODES[mode]), repeats)
    return prompt.shape[0] * new_tokens / median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="stories15m")
    parser.add_argument("--new", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script, measures nothing")
    args = parser.parse_args(argv)
    emit({"benchmark": "machine", **machine()})
    model = build_model(args.experiment, list(SMOKE_OVERRIDES) if args.smoke else [])
    prompt = torch.zeros(args.batch, 1, dtype=torch.long, device=device())
    start = time.perf_counter()
    generate(model, prompt, 2, compile=True)  # compiles the one-token step (and the eager paths warm up below)
    compile_s = time.perf_counter() - start
    for mode in ("recompute", "cached"):
        generate(model, prompt, 8, **MODES[mode])
    rows = []
    for new_tokens in args.new:
        rates = {mode: tokens_per_second(model, prompt, new_tokens, mode, args.repeats) for mode in MODES}
        rows.append(emit({
            "benchmark": "generation", "experiment": args.experiment, "batch": args.batch, "new_tokens": new_tokens,
            "context": model.config.context_length, "parameters": model.num_parameters(),
            **{f"{mode}_tokens_per_s": round(rate, 1) for mode, rate in rates.items()},
            "cache_speedup": round(rates["cached"] / rates["recompute"], 2),
            "compiled_speedup": round(rates["compiled"] / rates["recompute"], 2),
            "compile_over_eager_cache": round(rates["compiled"] / rates["cached"], 2),
            "compile_s": round(compile_s, 1),
        }))  # fmt: skip
    print()
    print(table(rows, COLUMNS))
    return rows


COLUMNS = [
    ("new_tokens", "new tokens"), ("recompute_tokens_per_s", "recompute tok/s"),
    ("cached_tokens_per_s", "cached tok/s"), ("compiled_tokens_per_s", "compiled tok/s"),
    ("cache_speedup", "cached/recompute"), ("compiled_speedup", "compiled/recompute"),
]  # fmt: skip


if __name__ == "__main__":
    main()
