"""Tables and plots for experiments/sequence/ from the runs' own logs (csv/metrics.csv, results.json).

    python experiments/sequence/summarize.py NAME=RUN_DIR [NAME=RUN_DIR ...] --out experiments/sequence

Writes ``results.md`` (per-phase / per-family last-position accuracy of the best checkpoint on the test
set, plus wall time) and ``val_accuracy.png`` (validation accuracy at the last position over steps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tiny_decoder.run.run_dir import RunDir  # noqa: E402


def table(runs: dict[str, Path]) -> str:
    results = {name: RunDir(path).read_results() for name, path in runs.items()}
    keys = [
        "test/acc_last",
        "test/phase1_acc_last",
        "test/phase2_acc_last",
        "test/phase3_acc_last",
        "test/acc",
        "test/mad",
        "test/loss",
    ]
    lines = [
        "| run | " + " | ".join(k.removeprefix("test/") for k in keys) + " | params | steps | wall time |",
        "|---" * (len(keys) + 4) + "|",
    ]
    for name, res in results.items():
        cells = [f"{res['test'].get(k, float('nan')):.4f}" for k in keys]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {res['parameters']:,} | {res['global_step']:,} | "
            f"{res['wall_time_s'] / 60:.1f} min |"
        )
    lines += [
        "",
        "Random baselines: acc 0.0039, mad 85.33, loss 5.545 (ln 256).",
        "",
        "Per family (test, last position):",
        "",
    ]
    families = sorted({k for res in results.values() for k in res["test"] if k.startswith("test_family/")})
    lines.append("| family | " + " | ".join(results) + " |")
    lines.append("|---" * (len(results) + 1) + "|")
    for family in families:
        name = family.removeprefix("test_family/").removesuffix("_acc_last")
        lines.append(
            f"| {name} | "
            + " | ".join(f"{res['test'].get(family, float('nan')):.3f}" for res in results.values())
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, Path], out: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    for name, path in runs.items():
        rows = RunDir(path).logged_rows("val/loss")
        steps = [r["step"] for r in rows]
        for ax, key in zip(
            axes, ["val/acc_last", "val/phase1_acc_last", "val/phase2_acc_last", "val/phase3_acc_last"], strict=True
        ):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=name)
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[0].set_ylabel("accuracy at the last position")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "val_accuracy.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    runs = {item.split("=", 1)[0]: Path(item.split("=", 1)[1]) for item in args.runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table(runs))
    plot(runs, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
