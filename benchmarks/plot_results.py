"""Plots of a ``run_all.py --out`` report: training tokens/s per attention x precision x compile, and generation
tokens/s per decoding mode.

    python benchmarks/plot_results.py benchmarks/results/latest.json    # writes training.png, generation.png beside it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETTINGS = [("32-true", False, "fp32"), ("32-true", True, "fp32 + compile"), ("bf16-mixed", False, "bf16"),
            ("bf16-mixed", True, "bf16 + compile")]  # fmt: skip
MODES = [("fast_tokens_per_s", "fast (default)"), ("bf16_tokens_per_s", "bf16"), ("int8_tokens_per_s", "int8"),
         ("cached_tokens_per_s", "module path"), ("run_c_tokens_per_s", "llama2.c run.c")]  # fmt: skip


def grouped_bars(groups: list[str], series: list[tuple[str, list[float]]], ylabel: str, title: str, path: Path):
    """One group of bars per entry of ``groups``, one bar per ``(label, values)`` series; saved to ``path``."""
    fig, ax = plt.subplots(figsize=(8 if len(groups) > 3 else 6, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))], values, width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training(rows: list[dict], path: Path, machine: str) -> Path:
    attentions = list(dict.fromkeys(r["attention"] for r in rows))
    rate = {(r["attention"], r["precision"], r["compile"]): r["lightning_tokens_per_s"] for r in rows}
    series = [(label, [rate.get((a, *setting), 0) for a in attentions]) for *setting, label in SETTINGS]
    title = f"stories15M shape, batch 16 x 256 tokens ({machine})"
    return grouped_bars(attentions, series, "training tokens/s (Lightning path)", title, path)


def plot_generation(rows: list[dict], path: Path, machine: str) -> Path:
    groups = [f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}" for r in rows]
    series = [(label, [r.get(key, 0) for r in rows]) for key, label in MODES if any(key in r for r in rows)]
    title = f"stories15M shape, {rows[0]['new_tokens']} new tokens ({machine})"
    return grouped_bars(groups, series, "tokens/s, batch 1, greedy", title, path)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    machine = f"{report['machine']['cpu']}, {report['machine']['cores']} cores, torch {report['machine']['torch']}"
    grid = [r for r in report["results"]["grid"] if r["benchmark"] == "training"]
    generation = [r for r in report["results"]["generation"] if r["benchmark"] == "generation"]
    paths = [plot_training(grid, args.report.with_name("training.png"), machine),
             plot_generation(generation, args.report.with_name("generation.png"), machine)]  # fmt: skip
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
