"""Every performance figure of the platform in one run, checked against its target.

    python benchmarks/run_all.py                 # ~35 min on a 2-core CPU
    python benchmarks/run_all.py --out benchmarks/results/latest.json --markdown
    python benchmarks/run_all.py --smoke         # every script on a tiny model: checks the wiring, judges nothing

Runs, one after the other, each in its own process (so one's threads, memory and compile caches do not touch
the next):

1. ``training.py`` at the stories15M and stories260K shapes (sdpa, fp32, eager): Lightning vs the hand-written
   loop, three times each, side by side; data loading share; FLOPs and MFU;
2. ``training.py`` at the stories15M shape over attention x precision x compile;
3. ``training.py`` at the stories260K shape without attention dropout (``model.attention_dropout=0``);
4. ``generation.py --hf``: every decoding mode (the generate tool's default ``compile=auto``, the fast eager step,
   bf16, int8, int4, compiled in each format, the module
   path) at batch 1, 256 new tokens, 1 and 2 threads, side by side with llama2.c's ``run.c`` when ``LLAMA2C_DIR``
   points at a llama2.c checkout (the one-thread build at 1 thread, the OpenMP build at 2), and batched sampling
   against Hugging Face; then a second process of the fast and compiled modes, whose warm-up is a second run's
   (the compiled programs loaded from the cache the first process wrote).

Then prints the platform's performance targets with the measured figure and whether it holds, and writes every
JSON line plus the targets to ``--out``. ``--markdown`` also prints the tables as Markdown (for
``benchmarks/RESULTS.md``). ``--smoke`` runs every script and code path on tiny models to check the wiring: its
figures mean nothing, so no target is judged (each says "not judged (smoke)").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchkit import cell

HERE = Path(__file__).resolve().parent

OVERHEAD = ["training.py", "--experiment", "stories15m", "stories260k", "--repeats", "3", "--steps", "10"]
# the stories260K recipe's attention dropout (0.05) makes CPU SDPA fall back to its unfused path: without it
ATTENTION_DROPOUT = ["training.py", "--experiment", "stories260k", "--override", "model.attention_dropout=0"]
GRID = ["training.py", "--experiment", "stories15m", "--attention", "sdpa", "standard", "linformer", "longformer",
        "--precision", "32-true", "bf16-mixed", "--compile", "false", "true"]  # fmt: skip
GENERATION = ["generation.py", "--hf"]
# a second process of the same shapes (the same TINY_DECODER_CACHE): the compiled modes load their programs, so
# its warm-up is what a user waits for on a second run
COMPILED_MODES = ["compiled", "compiled_bf16", "compiled_int8", "compiled_int4"]
GENERATION_AGAIN = ["generation.py", "--repeats", "1", "--threads", "1", "2", "--modes", "auto", "fast",
                    *COMPILED_MODES]  # fmt: skip
SMOKE = {  # every script and code path once, on a tiny model: checks the wiring; its figures mean nothing
    "overhead": ["training.py", "--experiment", "stories15m", "stories260k", "--smoke", "--steps", "2",
                 "--warmup", "1"],
    "grid": ["training.py", "--experiment", "stories15m", "--smoke", "--steps", "2", "--warmup", "1",
             "--precision", "32-true", "bf16-mixed"],
    "generation": ["generation.py", "--smoke", "--new", "8", "--repeats", "1", "--threads", "1", "--hf",
                   "--hf-batch", "2"],
    "generation_again": ["generation.py", "--smoke", "--new", "8", "--repeats", "1", "--threads", "1", "--modes",
                         "auto", "fast", *COMPILED_MODES],
}  # fmt: skip


def run_script(command: list[str]) -> list[dict[str, Any]]:
    """Run one benchmark script, echo its output, return its JSON lines."""
    print(f"$ python benchmarks/{' '.join(command)}", flush=True)
    process = subprocess.Popen([sys.executable, str(HERE / command[0]), *command[1:]], stdout=subprocess.PIPE,
                               text=True, cwd=HERE.parent)  # fmt: skip
    rows = []
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            rows.append(json.loads(line))
    if process.wait():
        raise SystemExit(f"benchmarks/{command[0]} failed with exit code {process.returncode}")
    return rows


@dataclass
class Target:
    """A figure the platform must reach: ``value(rows)`` of the run's JSON lines compared to ``threshold``."""

    name: str
    value: Callable[[dict[str, list[dict]]], float | None]
    threshold: float
    above: bool = True  # the figure must be >= threshold (else <=)

    def check(self, results: dict[str, list[dict]], judge: bool = True) -> dict[str, Any]:
        """The figure and its verdict; ``judge=False`` (a smoke run, whose figures mean nothing): no verdict,
        ``met`` is None."""
        value = self.value(results)
        met = None
        if value is None:
            verdict = "not measured"
        elif not judge:
            verdict = NOT_JUDGED
        else:
            met = value >= self.threshold if self.above else value <= self.threshold
            verdict = "met" if met else "NOT MET"
        return {"target": self.name, "value": value, "threshold": self.threshold,
                "relation": ">=" if self.above else "<=", "met": met, "verdict": verdict}  # fmt: skip


NOT_JUDGED = "not judged (smoke)"


def rows_of(results: dict[str, list[dict]], part: str, benchmark: str, **match: Any) -> list[dict]:
    return [
        r for r in results.get(part, []) if r["benchmark"] == benchmark and all(r.get(k) == v for k, v in match.items())
    ]


def first(rows: list[dict], key: str) -> float | None:
    return rows[0].get(key) if rows else None


BASE = {"attention": "sdpa", "precision": "32-true", "compile": False}


def speedup_over_fp32_eager(results: dict[str, list[dict]]) -> float | None:
    """Best training tokens/s of bf16-mixed and/or compile over fp32 eager (stories15M, sdpa, Lightning path)."""
    grid = rows_of(results, "grid", "training", attention="sdpa")
    base = [r for r in grid if r["precision"] == "32-true" and not r["compile"]]
    others = [r for r in grid if r not in base]
    if not base or not others:
        return None
    return round(max(r["lightning_tokens_per_s"] for r in others) / base[0]["lightning_tokens_per_s"], 2)


def best_over_run_c(results: dict[str, list[dict]], threads: int) -> float | None:
    """The best ``<mode>_over_run_c`` of the batch-1 generation row at ``threads`` (None without run.c)."""
    rows = rows_of(results, "generation", "generation", threads=threads)
    ratios = [value for key, value in rows[0].items() if key.endswith("_over_run_c")] if rows else []
    return max(ratios) if ratios else None


def best_over_hf(results: dict[str, list[dict]]) -> float | None:
    """The best ``<mode>_over_hf`` of the batched comparison."""
    rows = rows_of(results, "generation", "generation_batched")
    ratios = [value for key, value in rows[0].items() if key.endswith("_over_hf")] if rows else []
    return max(ratios) if ratios else None


def second_run_warm_up(results: dict[str, list[dict]]) -> float | None:
    """The longest warm-up of any mode in the second generation process (compiled programs loaded from disk)."""
    rows = rows_of(results, "generation_again", "generation")
    return max((value for row in rows for key, value in row.items() if key.endswith("_warmup_s")), default=None)


TARGETS = [
    Target("Lightning / hand-written loop tokens/s, stories15M shape",
           lambda r: first(rows_of(r, "overhead", "training", experiment="stories15m", **BASE), "lightning_over_loop"),
           0.9),
    Target("Lightning / hand-written loop tokens/s, stories260K shape",
           lambda r: first(rows_of(r, "overhead", "training", experiment="stories260k", **BASE), "lightning_over_loop"),
           0.9),
    Target("bf16-mixed and/or compile over fp32 eager, stories15M training", speedup_over_fp32_eager, 1.5),
    Target("default decoding (the generate tool's compile=auto, fp32) / run.c tokens/s, batch 1, 1 thread",
           lambda r: first(rows_of(r, "generation", "generation", threads=1), "auto_over_run_c"), 1.0),
    Target("best decoding mode / run.c tokens/s, batch 1, 1 thread", lambda r: best_over_run_c(r, 1), 1.5),
    Target("best decoding mode / run.c OpenMP tokens/s, batch 1, 2 threads", lambda r: best_over_run_c(r, 2), 1.5),
    Target("warm-up before the first token, any mode, second run of the shape (s)", second_run_warm_up, 5.0,
           above=False),
    Target("batched sampling (batch 32) / Hugging Face generate() tokens/s, best mode", best_over_hf, 3.0),
    Target("MFU, fp32, stories15M (of measured fp32 matmul FLOP/s)",
           lambda r: first(rows_of(r, "overhead", "training", experiment="stories15m", **BASE), "mfu"), 0.6),
    Target("data loading / step time, stories15M",
           lambda r: first(rows_of(r, "overhead", "training", experiment="stories15m", **BASE), "data_share"),
           0.05, above=False),
]  # fmt: skip


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


TRAINING_COLUMNS = [
    ("experiment", "shape"), ("overrides", "overrides"), ("attention", "attention"), ("precision", "precision"),
    ("compile", "compile"),
    ("lightning_tokens_per_s", "Lightning tok/s"), ("loop_tokens_per_s", "loop tok/s"),
    ("lightning_over_loop", "Lightning/loop"), ("achieved_gflops", "GFLOP/s"), ("mfu", "MFU"),
    ("mfu_of_best_matmul", "MFU of best matmul"), ("data_share", "data/step"),
]  # fmt: skip
GENERATION_COLUMNS = [
    ("threads", "threads"), ("auto_tokens_per_s", "auto (tool default) tok/s"),
    ("fast_tokens_per_s", "fast (eager) tok/s"), ("bf16_tokens_per_s", "bf16 tok/s"),
    ("int8_tokens_per_s", "int8 tok/s"), ("int4_tokens_per_s", "int4 tok/s"),
    ("compiled_tokens_per_s", "compiled tok/s"),
    ("compiled_bf16_tokens_per_s", "compiled bf16 tok/s"), ("compiled_int8_tokens_per_s", "compiled int8 tok/s"),
    ("compiled_int4_tokens_per_s", "compiled int4 tok/s"),
    ("cached_tokens_per_s", "module path tok/s"), ("run_c_tokens_per_s", "run.c tok/s"),
    ("auto_over_run_c", "auto / run.c"), ("fast_over_run_c", "fast / run.c"),
    ("compiled_over_run_c", "compiled / run.c"), ("compiled_int8_over_run_c", "compiled int8 / run.c"),
    ("compiled_int4_over_run_c", "compiled int4 / run.c"),
    ("auto_warmup_s", "auto warm-up s"), ("fast_warmup_s", "fast warm-up s"),
    ("compiled_int8_warmup_s", "compiled int8 warm-up s"), ("compiled_int4_warmup_s", "compiled int4 warm-up s"),
]  # fmt: skip
BATCHED_COLUMNS = [("batch", "batch"), ("threads", "threads"), ("fast_tokens_per_s", "fast tok/s"),
                   ("bf16_tokens_per_s", "bf16 tok/s"), ("int8_tokens_per_s", "int8 tok/s"),
                   ("compiled_tokens_per_s", "compiled tok/s"), ("compiled_bf16_tokens_per_s", "compiled bf16 tok/s"),
                   ("hf_tokens_per_s", "HF generate() tok/s"), ("fast_over_hf", "fast / HF"),
                   ("bf16_over_hf", "bf16 / HF")]  # fmt: skip
TARGET_COLUMNS = [("target", "target"), ("relation", ""), ("threshold", "threshold"), ("value", "measured"),
                  ("verdict", "verdict")]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write all JSON lines and the targets here (JSON)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    smoke_help = "tiny models: checks every script; its figures mean nothing, so no target is judged"
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    args = parser.parse_args(argv)
    parts = SMOKE if args.smoke else {
        "overhead": OVERHEAD, "grid": GRID, "attention_dropout": ATTENTION_DROPOUT, "generation": GENERATION,
        "generation_again": GENERATION_AGAIN,
    }  # fmt: skip
    results = {part: run_script(command) for part, command in parts.items()}
    targets = [target.check(results, judge=not args.smoke) for target in TARGETS]
    print("\nTargets" + (" (smoke run on tiny models: figures not comparable, nothing judged)" if args.smoke else ""))
    for row in targets:
        print(f"  {row['target']}: {row['value']} ({row['relation']} {row['threshold']}): {row['verdict']}")
    machines = rows_of(results, "overhead", "machine")
    report = {"machine": machines[0] if machines else None, "smoke": args.smoke, "results": results, "targets": targets}
    if args.markdown:
        training = [r for part in ("overhead", "grid", "attention_dropout") for r in rows_of(results, part, "training")]
        print("\n" + markdown(training, TRAINING_COLUMNS))
        print("\n" + markdown(rows_of(results, "generation", "generation"), GENERATION_COLUMNS))
        print("\n" + markdown(rows_of(results, "generation_again", "generation"), GENERATION_COLUMNS))
        print("\n" + markdown(rows_of(results, "generation", "generation_batched"), BATCHED_COLUMNS))
        print("\n" + markdown(targets, TARGET_COLUMNS))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
