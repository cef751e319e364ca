"""Decoding throughput of every mode of ``generate``, side by side with llama2.c's ``run.c`` and Hugging Face.

    python benchmarks/generation.py [--experiment stories15m] [--new 256] [--threads 1 2] [--repeats 3]
        [--llama2c DIR | env LLAMA2C_DIR] [--modes auto fast bf16 int8 int4 cached compiled recompute] [--hf]

Builds the recipe's model (``+experiment=NAME``: the stories15M shape is d 288, 6 layers, 6 heads, SwiGLU 768,
RoPE, context 256, vocabulary 4096) with random weights (the work per token does not depend on them) and
decodes greedily at batch ``--batch`` from a 1-token prompt, ``--new`` tokens, one row per mode and thread
count (``tiny_decoder.model.generation.generate``):

- ``auto``: the ``generate`` tool's default (``compile=auto``, the model's fp32 numerics): at ``--new`` >= 64 on a
  CPU with a C++ compiler the compiled program (``compiled``), else the fast eager step;
- ``fast``: the default of the Python ``generate()`` (the fast eager step, no compilation); ``bf16`` / ``int8`` /
  ``int4``: the same step with ``weights=bf16`` / ``weights=int8`` / ``weights=int4`` (opt-in, numerics change);
- ``cached``: the eager KV cache through the model's modules (``fast=False``);
- ``compiled`` / ``compiled_bf16`` / ``compiled_int8`` / ``compiled_int4``: the fast step's one-token steps as the
  AOTInductor program (``compile=True``, :mod:`tiny_decoder.model.compiled_step`), in each weight format; its
  compilation or loading is the mode's ``warmup_s`` (the first process of a shape compiles, later ones load the
  program from ``$TINY_DECODER_CACHE``: run the script twice, or point it at an empty folder, to see both).
  ``compiled_int4`` at batch 1 is the native loop (:mod:`tiny_decoder.model.native_decoder`: the same int4
  weights, a whole greedy continuation in one parallel region; its library is built in ~1 s on first use);
- ``recompute``: no cache (``use_cache=False``).

``warmup_s`` of every mode is its first call (2 tokens) at each thread count (a compiled program is made for one
thread count), what a user waits for before the first token.

llama2.c: with ``--llama2c DIR`` (or ``LLAMA2C_DIR``), a checkout of karpathy/llama2.c, the script compiles
``DIR/run.c`` into a temporary folder (``gcc -Ofast`` for one thread; its Makefile's ``runomp`` flags,
``-Ofast -fopenmp -march=native``, with ``OMP_NUM_THREADS`` = the thread count otherwise), writes the same
model with the project's llama2.c exporter (``model.bin`` v0) and a byte-fallback ``tokenizer.bin``, and runs
``run model.bin -t 0 -n <context> -i a`` greedily. Nothing of llama2.c is kept. Like with like: ``run.c``
reports tokens/s over its forwards after the first one, the project's figure is ``--new`` tokens over the whole
``generate`` call (the prompt's forward and setup included), so the ratios are conservative for the project.
The runs of all modes and of ``run.c`` are interleaved, ``--repeats`` rounds, medians reported.

``--hf``: batched throughput at ``--hf-batch`` (32) with sampling (temperature 1), ``--new`` tokens, of the fast
step (fp32, bf16, int8) against Hugging Face ``generate()`` of the same model exported by
``tiny_decoder.interop.hf.to_hf`` (fp32), on ``--hf-threads`` threads. One JSON line per measurement, then tables.

``--quality CKPT``: instead, the opt-in formats' agreement with fp32 on a trained language model (``quality``;
``native_int4``: the native loop of ``compile=true weights=int4``, its activations in fp32);
with ``--quality-text FILE`` also each format's bits per byte on the first ``--quality-blocks`` context blocks of
that story file, teacher-forced through the decoding step (``validation_bits_per_byte``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from benchkit import SMOKE_OVERRIDES, device, emit, machine, recipe_model_config, table, timed

from tiny_decoder.model import DecoderTransformer
from tiny_decoder.model.generation import generate

MODES: dict[str, dict[str, Any]] = {
    "auto": {"compile": "auto"},
    "fast": {},
    "bf16": {"weights": "bf16"},
    "int8": {"weights": "int8"},
    "int4": {"weights": "int4"},
    "cached": {"fast": False},
    "compiled": {"compile": True},
    "compiled_bf16": {"compile": True, "weights": "bf16"},
    "compiled_int8": {"compile": True, "weights": "int8"},
    "compiled_int4": {"compile": True, "weights": "int4"},
    "recompute": {"use_cache": False},
}
DEFAULT_MODES = ["auto", "fast", "bf16", "int8", "int4", "compiled", "compiled_bf16", "compiled_int8", "compiled_int4",
                 "cached"]  # fmt: skip
RUN_C_RATE = re.compile(r"achieved tok/s: ([0-9.]+)")


def build_model(experiment: str, overrides: list[str]) -> DecoderTransformer:
    torch.manual_seed(0)
    return DecoderTransformer(recipe_model_config(experiment, overrides)).to(device()).eval()


# ------------------------------------------------------------------ llama2.c


def run_c_tokenizer(vocab_size: int) -> tuple[list[bytes], list[float]]:
    """Pieces ``run.c`` can encode any prompt with: its specials, the 256 byte-fallback pieces, a space."""
    pieces = [b"<unk>", b"<s>", b"</s>", *(f"<0x{b:02X}>".encode() for b in range(256)), b" "]
    pieces += [f"t{i}".encode() for i in range(vocab_size - len(pieces))]
    return pieces[:vocab_size], [0.0] * vocab_size


class RunC:
    """``run.c`` built from a llama2.c checkout, with the benchmark's model in its format (a temp folder)."""

    def __init__(self, source: Path, model: DecoderTransformer):
        from tiny_decoder.interop import llama2c
        from tiny_decoder.interop.llama import llama_weights

        self.folder = Path(tempfile.mkdtemp(prefix="tiny_decoder_run_c_"))
        self.binaries = {
            1: self._compile(source, "run", ["-Ofast"]),
            2: self._compile(source, "runomp", ["-Ofast", "-fopenmp", "-march=native"]),
        }
        shape, weights = llama_weights(model, "llama2c")
        llama2c.write_model_bin(self.folder / "model.bin", shape, weights, 0)
        pieces, scores = run_c_tokenizer(shape.vocab_size)
        llama2c.write_tokenizer_bin(self.folder / "tokenizer.bin", pieces, scores)
        self.steps = shape.seq_len

    def _compile(self, source: Path, name: str, flags: list[str]) -> Path:
        out = self.folder / name
        subprocess.run(["gcc", *flags, "-o", str(out), str(source / "run.c"), "-lm"], check=True)
        return out

    def tokens_per_second(self, threads: int) -> float:
        binary = self.binaries[1 if threads == 1 else 2]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [str(binary), "model.bin", "-z", "tokenizer.bin", "-t", "0", "-n", str(self.steps), "-i", "a"]
        result = subprocess.run(command, cwd=self.folder, env=env, capture_output=True, text=True, check=True)
        match = RUN_C_RATE.search(result.stderr)
        if match is None:
            raise SystemExit(f"run.c printed no 'achieved tok/s' line: {result.stderr[-300:]}")
        return float(match.group(1))


def llama2c_source(argument: str | None) -> Path | None:
    """The llama2.c checkout of ``--llama2c`` or ``LLAMA2C_DIR`` (None: no run.c column)."""
    value = argument or os.environ.get("LLAMA2C_DIR")
    if not value:
        return None
    source = Path(value)
    if not (source / "run.c").is_file():
        raise SystemExit(f"error: --llama2c / LLAMA2C_DIR={value} has no run.c: point it at a llama2.c checkout")
    return source


# ------------------------------------------------------------------ measurements


def decode_seconds(model: DecoderTransformer, prompt: torch.Tensor, new: int, options: dict[str, Any]) -> float:
    return timed(lambda: generate(model, prompt, new, **options), 1)[0]


def warm_up(model: DecoderTransformer, prompt: torch.Tensor, modes: list[str]) -> dict[str, float]:
    """Seconds of each mode's first call (2 tokens): compilation, weight preparation."""
    return {mode: round(decode_seconds(model, prompt, 2, MODES[mode]), 2) for mode in modes}


def interleaved(model: DecoderTransformer, args: argparse.Namespace, threads: int, run_c: RunC | None) -> dict:
    """Median tokens/s of every mode (and run.c) over ``--repeats`` interleaved rounds at ``threads``, and each
    mode's warm-up (``<mode>_warmup_s``)."""
    torch.set_num_threads(threads)
    prompt = torch.zeros(args.batch, 1, dtype=torch.long, device=device())
    warmup = warm_up(model, prompt, args.modes)
    rates: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for mode in args.modes:
            seconds = decode_seconds(model, prompt, args.new, MODES[mode])
            rates.setdefault(mode, []).append(args.batch * args.new / seconds)
        if run_c is not None and args.batch == 1:
            rates.setdefault("run_c", []).append(run_c.tokens_per_second(threads))
    medians: dict[str, float] = {name: statistics.median(values) for name, values in rates.items()}
    return medians | {f"{mode}_warmup_s": seconds for mode, seconds in warmup.items()}


def hf_comparison(model: DecoderTransformer, args: argparse.Namespace) -> dict[str, Any]:
    """Batched sampling: the fast step (fp32, and the opt-in bf16 / int8 weights) vs Hugging Face ``generate()``
    of the exported model (fp32), interleaved ``--hf-repeats`` rounds."""
    from tiny_decoder.interop.hf import to_hf

    hf_model = to_hf(model).to(device()).eval()
    prompt = torch.ones(args.hf_batch, 1, dtype=torch.long, device=device())
    tokens = args.hf_batch * args.new
    ours = {name: MODES[name] for name in ("fast", "bf16", "int8", "compiled", "compiled_bf16", "compiled_int8")}

    def theirs(new: int) -> None:
        hf_model.generate(prompt, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=new, min_new_tokens=new,
                          attention_mask=torch.ones_like(prompt))  # fmt: skip

    seconds: dict[str, list[float]] = {}
    with torch.no_grad():
        for options in ours.values():  # warm-up: weight preparation
            generate(model, prompt, 2, temperature=1.0, **options)
        theirs(2)
        for _ in range(args.hf_repeats):
            for name, options in ours.items():
                run = {"temperature": 1.0, **options}
                seconds.setdefault(name, []).append(decode_seconds(model, prompt, args.new, run))
            seconds.setdefault("hf", []).append(timed(lambda: theirs(args.new), 1)[0])
    rates = {name: tokens / statistics.median(values) for name, values in seconds.items()}
    row: dict[str, Any] = {"benchmark": "generation_batched", "batch": args.hf_batch, "new_tokens": args.new,
                           "threads": torch.get_num_threads()}  # fmt: skip
    row.update({f"{name}_tokens_per_s": round(rate, 1) for name, rate in rates.items()})
    row.update({f"{name}_over_hf": round(rates[name] / rates["hf"], 2) for name in ours})
    return row


OPT_IN_FORMATS = ("bf16", "int8", "int4", "native_int4")  # native_int4: compile=true weights=int4 at batch 1


def teacher_forced_decoder(model: DecoderTransformer, weights: str, batch: int) -> Any:
    """The decoding step of a format, fed one token at a time: the fast step, or for ``native_int4`` the native
    loop (batch 1 only: the caller feeds each row through its own)."""
    from tiny_decoder.model.fast_decoding import PREPARED_WEIGHTS, FastDecoder
    from tiny_decoder.model.native_decoder import NativeInt4Decoder

    if weights == "native_int4":
        assert batch == 1
        return NativeInt4Decoder(model)
    return FastDecoder(PREPARED_WEIGHTS.get(model, weights), batch)


QUALITY_PROMPTS = ["Once upon a time", "The little dog", "One day, a girl named Lily", "Tom and his mom",
                   "The sun was", "In the park, there was", "The cat saw a", "Mia wanted to"]  # fmt: skip


def quality(checkpoint: str, new: int) -> list[dict[str, Any]]:
    """bf16 / int8 / int4 against the model's own numerics on a trained language model: greedy continuations (fp32) of
    ``QUALITY_PROMPTS``, then each format teacher-forced along them: the share of positions where its greedy
    token is fp32's, and the change of the mean log-probability of fp32's tokens (nats)."""
    from tiny_decoder.tasks import load_task

    task = load_task(checkpoint)
    model = task.model.eval()
    rows = []
    context = model.config.context_length
    sequences = []
    for text in QUALITY_PROMPTS:
        ids = torch.tensor([task.encode_prompt(text)[: context // 2]])
        sequences.append(generate(model, ids, min(new, context - ids.shape[1])))
    for weights in OPT_IN_FORMATS:
        agree, total, logprob_change = 0, 0, 0.0
        for tokens in sequences:
            logits = {}
            for name in ("model", weights):
                decoder = teacher_forced_decoder(model, name, 1)
                with torch.inference_mode():
                    steps = [decoder(tokens[:, :1])] + [
                        decoder(tokens[:, n : n + 1]) for n in range(1, tokens.shape[1] - 1)
                    ]
                logits[name] = torch.cat(steps).float().log_softmax(-1)
            targets = tokens[0, 1:]
            agree += int((logits[weights].argmax(-1) == logits["model"].argmax(-1)).sum())
            total += targets.numel()
            picked = {name: value.gather(1, targets[:, None]).mean() for name, value in logits.items()}
            logprob_change += float(picked[weights] - picked["model"]) * targets.numel()
        rows.append(emit({"benchmark": "generation_quality", "checkpoint": Path(checkpoint).name, "weights": weights,
                          "greedy_agreement": round(agree / total, 4),
                          "mean_logprob_change_nats": round(logprob_change / total, 5),
                          "positions": total}))  # fmt: skip
    return rows


def validation_bits_per_byte(checkpoint: str, path: str, blocks: int) -> list[dict[str, Any]]:
    """Bits per byte of the first ``blocks`` validation blocks of ``path`` (packed by the text data module as
    ``evaluate`` packs them, with the checkpoint's tokenizer) teacher-forced through the decoding step (one token
    at a time through the KV cache, all blocks as one batch), in each weight format: the change the opt-in formats
    make to the validation score, measured on the path that decodes."""
    from functools import partial

    from tiny_decoder.data.text import TextDataModule
    from tiny_decoder.tasks import load_task
    from tiny_decoder.training.metrics import bits_per_byte

    task = load_task(checkpoint)
    model = task.model.eval()
    data = task.text_datamodule(partial(TextDataModule, files={"validation": path}, hub_dataset=None))
    data.setup("test")
    split = data.datasets["validation"]
    picked = [split[i] for i in range(min(blocks, len(split)))]
    inputs, targets = (torch.stack([block[name] for block in picked]) for name in ("input", "target"))
    bits = {}
    for weights in ("model", *OPT_IN_FORMATS):
        rows = [slice(i, i + 1) for i in range(len(picked))] if weights == "native_int4" else [slice(None)]
        nats = 0.0
        with torch.inference_mode():
            for part in rows:  # all blocks as one batch, or (the batch-1 native loop) one by one
                decoder = teacher_forced_decoder(model, weights, inputs[part].shape[0])
                for n in range(inputs.shape[1]):
                    logits = decoder(inputs[part, n : n + 1]).float().log_softmax(-1)
                    nats -= float(logits.gather(1, targets[part, n : n + 1]).sum())
        bits[weights] = bits_per_byte(nats / targets.numel(), data.bytes_per_token["validation"])
    return [
        emit(
            {
                "benchmark": "generation_validation_bpb",
                "checkpoint": Path(checkpoint).name,
                "weights": weights,
                "blocks": len(picked),
                "predicted_tokens": targets.numel(),
                "bits_per_byte": round(value, 5),
                "change_vs_fp32": round(value - bits["model"], 5),
            }
        )  # fmt: skip
        for weights, value in bits.items()
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="stories15m")
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--llama2c", help="a llama2.c checkout (default: env LLAMA2C_DIR; unset: no run.c column)")
    parser.add_argument("--hf", action="store_true", help="also batched sampling against Hugging Face generate()")
    parser.add_argument("--hf-batch", type=int, default=32)
    parser.add_argument("--hf-repeats", type=int, default=1, help="interleaved rounds of the batched comparison")
    parser.add_argument("--hf-threads", type=int, default=1, help="threads of the batched comparison")
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script, measures nothing")
    parser.add_argument("--quality", metavar="CKPT", help="only: the opt-in formats against fp32 on this checkpoint")
    parser.add_argument(
        "--quality-text",
        metavar="FILE",
        help="with --quality: also the validation bits per byte "
        "of each format on the first --quality-blocks context blocks of this story file",
    )
    parser.add_argument("--quality-blocks", type=int, default=32)
    args = parser.parse_args(argv)
    emit({"benchmark": "machine", **machine()})
    if args.quality:
        rows = quality(args.quality, args.new)
        if args.quality_text:
            rows += validation_bits_per_byte(args.quality, args.quality_text, args.quality_blocks)
        return rows
    model = build_model(args.experiment, list(SMOKE_OVERRIDES) if args.smoke else [])
    source = llama2c_source(args.llama2c)
    run_c = RunC(source, model) if source is not None and not args.smoke else None
    rows = []
    for threads in args.threads:
        measured = interleaved(model, args, threads, run_c)
        rates = {name: value for name, value in measured.items() if not name.endswith("_warmup_s")}
        row: dict[str, Any] = {"benchmark": "generation", "experiment": args.experiment, "batch": args.batch,
                               "new_tokens": args.new, "threads": threads,
                               "parameters": model.num_parameters()}  # fmt: skip
        row.update({f"{name}_tokens_per_s": round(rate, 1) for name, rate in rates.items()})
        if "run_c" in rates:
            row.update({f"{mode}_over_run_c": round(rates[mode] / rates["run_c"], 2) for mode in args.modes})
        row.update({name: value for name, value in measured.items() if name.endswith("_warmup_s")})
        rows.append(emit(row))
    if args.hf:
        torch.set_num_threads(args.hf_threads)
        rows.append(emit(hf_comparison(model, args)))
    print()
    columns = [("threads", "threads")] + [(f"{m}_tokens_per_s", f"{m} tok/s") for m in [*args.modes, "run_c"]]
    columns += [(f"{m}_over_run_c", f"{m}/run.c") for m in args.modes]
    print(table([r for r in rows if r["benchmark"] == "generation"], columns))
    return rows


if __name__ == "__main__":
    main()
