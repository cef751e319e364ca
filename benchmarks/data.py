"""Data preparation at full-corpus scale: a synthetic corpus of the shared TinyStories stories (shuffled repeats)
of each size, prepared from an empty cache, and a mid-epoch resume on it.

    flock /tmp/tiny_decoder_bench.lock python benchmarks/data.py --sizes-mb 200 1000   # ~15 min on 2 cores
    python benchmarks/data.py --smoke                                                    # 5 MB, seconds

Each corpus is written to a temporary folder (``--dir`` to choose it; deleted afterwards unless ``--keep``),
never into the repository. Per size, in processes of their own:

- **prepare**: ``TextDataModule(files={"train": corpus}, tokenizer_path=T).prepare_data()`` on an empty cache
  (the stories format, 5% of the stories held out, vocabulary 2,048, context 256; the tokenizer T trained once
  beforehand on the shared stories, so the figure is reading, tokenizing and writing): wall time, MB/s of text,
  tokens/s, the peak RSS of the whole process tree (sampled from /proc every 50 ms, and the largest process's
  ``ru_maxrss``, started from a small launcher so this process's size does not leak into it), the disk left in
  the cache folder (allocated blocks) and the token files' size.
- **raw encode_batch**: the same tokenizer's ``encode_batch`` and ``encode_batch_fast`` (no offsets: what the
  pipeline calls) on the first ``--raw-mb`` MB of the same corpus, already in memory, in batches of 10,000
  stories on every core (the Rust tokenizer's threads), nothing else: the faster of the two is the limit of any
  pipeline on this machine.
- **resume** (the largest size): the training loader of a run killed at 10%, 50% and 90% of its first epoch,
  resumed: the time from ``iter(loader)`` to its first batch with the resumable loader (skips indices, loads
  nothing) against replaying the skipped batches (what resuming did before: load and collate each of them).

One JSON line per measurement, then a table and the targets of issue 16.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchkit import REPO_ROOT, SHARED_TEXT, emit, machine, table

TINYSTORIES = SHARED_TEXT.parent
STORY_FILES = (SHARED_TEXT, TINYSTORIES / "tinystories_v2_train_head.txt", TINYSTORIES / "tinystories_valid_head.txt")
EOT = "<|endoftext|>"
VOCAB, CONTEXT, BATCH = 2048, 256, 32
MB = 1e6
RESUME_POSITIONS = (0.1, 0.5, 0.9)
TARGETS = {"peak_rss_mb_max": 1500, "rss_growth_max": 1.2, "raw_share_min": 0.8, "cache_ratio_max": 1.2}

PREPARE = """
import json, sys, time
from tiny_decoder.data.text import TextDataModule
corpus, tokenizer, cache, vocab, context = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
started = time.perf_counter()
dm = TextDataModule(files={"train": corpus}, tokenizer_path=tokenizer, vocab_size=vocab, context_length=context,
                    cache_dir=cache, text_format="stories", val_fraction=0.05)
dm.prepare_data()
seconds = time.perf_counter() - started
stats = json.load(open(dm.cache_path / "meta.json"))["splits"]
print("RESULT " + json.dumps({"seconds": seconds, "splits": stats, "cache_path": str(dm.cache_path)}))
"""

RAW = """
import json, sys, time
from tokenizers import Tokenizer
corpus, tokenizer, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = Tokenizer.from_file(tokenizer)
text = open(corpus, encoding="utf-8").read(limit)
docs = [s.strip() for s in text.split("<|endoftext|>")[:-1] if s.strip()]
n_bytes = sum(len(d.encode("utf-8")) for d in docs)
tok.encode_batch(docs[:1000])  # warm-up: the thread pool
rates = {}
for name in ("encode_batch", "encode_batch_fast"):
    encode = getattr(tok, name)
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), 10000):
        tokens += sum(len(e.ids) for e in encode(docs[i:i + 10000]))
    rates[name] = {"seconds": time.perf_counter() - started, "tokens": tokens}
print("RESULT " + json.dumps({"bytes": n_bytes, "rates": rates}))
"""

RESUME = """
import json, sys, time
from tiny_decoder.data.text import TextDataModule
from tiny_decoder.training.callbacks import resumable_loader
corpus, tokenizer, cache, fraction = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
vocab, context, batch = (int(arg) for arg in sys.argv[5:8])
dm = TextDataModule(files={"train": corpus}, tokenizer_path=tokenizer, vocab_size=vocab, context_length=context,
                    cache_dir=cache, text_format="stories", val_fraction=0.05, batch_size=batch)
dm.setup()
n_batches = len(dm.train_dataloader())
position = int(n_batches * fraction)
loader = resumable_loader(dm.train_dataloader(), seed=0, epoch_fn=lambda: 0)
loader.load_state_dict({"epoch": 0, "batches": position})
started = time.perf_counter()
first = next(iter(loader))
skip_s = time.perf_counter() - started
replayed = iter(dm.train_dataloader())  # before: the skipped batches loaded and collated, then the next one
started = time.perf_counter()
for _ in range(position + 1):
    next(replayed)
replay_s = time.perf_counter() - started
print("RESULT " + json.dumps({"batches": n_batches, "position": position, "skip_s": skip_s, "replay_s": replay_s}))
"""

# a small launcher runs the command and prints its largest child's peak (see benchmarks/memory.py)
LAUNCHER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(f'peak_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); sys.exit(code)"
)


# ----------------------------------------------------------------------------- corpora


def read_stories() -> list[str]:
    stories = []
    for path in STORY_FILES:
        stories += [s.strip() for s in path.read_text(encoding="utf-8").split(EOT) if s.strip()]
    return stories


def write_corpus(path: Path, size_mb: float, stories: list[str], seed: int = 0) -> int:
    """Shuffled repeats of ``stories`` until ``size_mb`` MB, written as it goes; the bytes written."""
    rng = random.Random(seed)
    written, target = 0, int(size_mb * MB)
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            order = stories[:]
            rng.shuffle(order)
            for story in order:
                record = f"{story}\n{EOT}\n"
                out.write(record)
                written += len(record.encode("utf-8"))
                if written >= target:
                    break
    return written


def train_tokenizer(path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from tiny_decoder.data.tokenizer import load_or_train_tokenizer; "
        f"stories = Path(sys.argv[2]).read_text(encoding='utf-8').split({EOT!r}); "
        f"load_or_train_tokenizer(Path(sys.argv[1]), lambda: [stories], {VOCAB})"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(SHARED_TEXT)], check=True, cwd=REPO_ROOT)


# ----------------------------------------------------------------------------- measuring a child


def _tree_rss_kib(pid: int) -> int:
    """Resident KiB of ``pid`` and all its descendants (0 for processes gone meanwhile)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def run_child(code: str, *args: str) -> dict[str, Any]:
    """Run ``python -c code args`` from the launcher; its RESULT json, wall seconds and peak RSS (tree, sampled;
    the largest process, ru_maxrss) in MB."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-c", LAUNCHER, sys.executable, "-c", code, *args]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)  # fmt: skip
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            launcher = _tree_rss_kib(process.pid) - _rss_kib(process.pid)  # the launcher itself is not measured
            peak[0] = max(peak[0], launcher)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    wall = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"child failed ({process.returncode}):\n{output[-3000:]}")
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    max_rss = int(output.rpartition("peak_kib=")[2]) * 1024 / MB
    return {**result, "wall_s": wall, "tree_peak_rss_mb": peak[0] * 1024 / MB, "max_rss_mb": max_rss}


def _rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), 0))


def disk_bytes(folder: Path) -> int:
    """Bytes allocated on disk to every file under ``folder`` (sparse holes not counted)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the measurements


def measure_prepare(corpus: Path, tokenizer: Path, cache: Path, size_mb: float) -> dict[str, Any]:
    shutil.rmtree(cache, ignore_errors=True)
    result = run_child(PREPARE, str(corpus), str(tokenizer), str(cache), str(VOCAB), str(CONTEXT))
    splits = result["splits"]
    text_mb = sum(s["bytes"] for s in splits.values()) / MB
    tokens = sum(s["tokens"] for s in splits.values())
    token_files = sum(p.stat().st_size for p in Path(result["cache_path"]).glob("*.bin"))
    return emit({
        "benchmark": "data_prepare", "corpus_mb": size_mb, "file_mb": round(corpus.stat().st_size / MB, 1),
        "text_mb": round(text_mb, 2), "tokens": tokens, "prepare_s": round(result["seconds"], 3),
        "wall_s": round(result["wall_s"], 2), "mb_per_s": round(text_mb / result["seconds"], 2),
        "tokens_per_s": round(tokens / result["seconds"]),
        "peak_rss_mb": round(max(result["tree_peak_rss_mb"], result["max_rss_mb"])),
        "tree_peak_rss_mb": round(result["tree_peak_rss_mb"]), "max_rss_mb": round(result["max_rss_mb"]),
        "cache_disk_mb": round(disk_bytes(cache) / MB, 1), "token_files_mb": round(token_files / MB, 1),
        "cache_ratio": round(disk_bytes(cache) / token_files, 3),
    })  # fmt: skip


def measure_raw(corpus: Path, tokenizer: Path, size_mb: float, raw_mb: float) -> dict[str, Any]:
    """encode_batch and encode_batch_fast (no offsets, what the pipeline calls): the faster one is the limit."""
    result = run_child(RAW, str(corpus), str(tokenizer), str(int(raw_mb * MB)))
    mb = result["bytes"] / MB
    rates = {name: mb / r["seconds"] for name, r in result["rates"].items()}
    best = max(rates, key=rates.__getitem__)
    return emit({
        "benchmark": "data_raw_encode", "corpus_mb": size_mb, "sample_mb": round(mb, 1),
        "encode_batch_mb_per_s": round(rates["encode_batch"], 2),
        "encode_batch_fast_mb_per_s": round(rates["encode_batch_fast"], 2),
        "mb_per_s": round(rates[best], 2), "fastest": best,
        "tokens_per_s": round(result["rates"][best]["tokens"] / result["rates"][best]["seconds"]),
    })  # fmt: skip


def measure_resume(corpus: Path, tokenizer: Path, cache: Path, size_mb: float, fraction: float) -> dict[str, Any]:
    result = run_child(
        RESUME, str(corpus), str(tokenizer), str(cache), str(fraction), str(VOCAB), str(CONTEXT), str(BATCH)
    )
    return emit({
        "benchmark": "data_resume", "corpus_mb": size_mb, "epoch_batches": result["batches"],
        "position": result["position"], "skip_s": round(result["skip_s"], 3), "replay_s": round(result["replay_s"], 2),
    })  # fmt: skip


PREPARE_COLUMNS = [
    ("corpus_mb", "corpus MB"), ("prepare_s", "prepare s"), ("mb_per_s", "MB/s"), ("tokens_per_s", "tokens/s"),
    ("peak_rss_mb", "peak RSS MB"), ("cache_disk_mb", "cache MB"), ("token_files_mb", "token files MB"),
    ("cache_ratio", "cache/tokens"), ("raw_mb_per_s", "raw encode MB/s"), ("raw_share", "pipeline/raw"),
]  # fmt: skip
RESUME_COLUMNS = [("corpus_mb", "corpus MB"), ("position", "resumed at batch"), ("epoch_batches", "of"),
                  ("skip_s", "first batch s (skip)"), ("replay_s", "first batch s (replay, before)")]  # fmt: skip


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 16's targets, checked on the largest and smallest corpora measured."""
    small, large = rows[0], rows[-1]
    growth = large["peak_rss_mb"] / small["peak_rss_mb"]
    return [
        {"target": f"peak RSS at {large['corpus_mb']:g} MB <= 1.5 GB", "value": large["peak_rss_mb"],
         "met": large["peak_rss_mb"] <= TARGETS["peak_rss_mb_max"]},
        {"target": f"peak RSS {large['corpus_mb']:g} MB / {small['corpus_mb']:g} MB <= 1.2", "value": round(growth, 3),
         "met": growth <= TARGETS["rss_growth_max"]},
        *({"target": f"pipeline / raw encode_batch MB/s >= 0.8 ({r['corpus_mb']:g} MB)", "value": r["raw_share"],
           "met": r["raw_share"] >= TARGETS["raw_share_min"]} for r in rows),
        *({"target": f"cache on disk / token files <= 1.2 ({r['corpus_mb']:g} MB)", "value": r["cache_ratio"],
           "met": r["cache_ratio"] <= TARGETS["cache_ratio_max"]} for r in rows),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", nargs="+", type=float, default=[200, 1000], help="corpus sizes (MB of text)")
    parser.add_argument("--raw-mb", type=float, default=40, help="MB of the corpus for the raw encode_batch rate")
    parser.add_argument("--dir", type=Path, default=None, help="where the corpora go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    parser.add_argument("--no-resume", action="store_true", help="skip the resume measurement")
    parser.add_argument("--smoke", action="store_true", help="one 5 MB corpus, 2 MB raw sample")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes_mb, args.raw_mb = [5], 2
    root = Path(tempfile.mkdtemp(prefix="data_bench_", dir=args.dir))
    emit({"benchmark": "machine", **machine(), "work_dir": str(root)})
    try:
        stories = read_stories()
        tokenizer = root / "tokenizer.json"
        train_tokenizer(tokenizer)
        rows, resumes = [], []
        for size_mb in sorted(args.sizes_mb):
            corpus = root / f"corpus_{size_mb:g}mb.txt"
            write_corpus(corpus, size_mb, stories)
            cache = root / f"cache_{size_mb:g}mb"
            row = measure_prepare(corpus, tokenizer, cache, size_mb)
            raw = measure_raw(corpus, tokenizer, size_mb, min(args.raw_mb, size_mb))
            row.update(raw_mb_per_s=raw["mb_per_s"], raw_share=round(row["mb_per_s"] / raw["mb_per_s"], 3))
            rows.append(row)
            if size_mb == max(args.sizes_mb) and not args.no_resume:
                resumes = [measure_resume(corpus, tokenizer, cache, size_mb, f) for f in RESUME_POSITIONS]
            if not args.keep:
                corpus.unlink()
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n" + table(rows, PREPARE_COLUMNS))
    if resumes:
        print("\n" + table(resumes, RESUME_COLUMNS))
    checked = targets(rows)
    for row in checked:
        emit({"benchmark": "data_target", **row})
    print("\n" + table(checked, [("target", "target"), ("value", "measured"), ("met", "met")]))
    return rows + resumes + checked


if __name__ == "__main__":
    main()
