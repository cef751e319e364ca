"""Plot of a TinyStories run from its own CSV log: validation loss and bits per byte over steps and
tokens seen, with the plain-GPT reference line.

    python experiments/tinystories/summarize.py RUN_DIR --out experiments/tinystories
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tiny_decoder.run.run_dir import RunDir  # noqa: E402

REFERENCE_BPB = 1.49  # plain hand-written GPT, 2.2M params, 15 minutes on this 2-core machine (issue 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--tokens-per-step", type=int, default=32 * 256)
    args = parser.parse_args()
    rows = RunDir(args.run).logged_rows("val/bpb")
    steps = [r["step"] + 1 for r in rows]
    tokens = [s * args.tokens_per_step / 1e6 for s in steps]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_loss.plot(tokens, [r["val/loss"] for r in rows], "o-")
    ax_loss.set_xlabel("training tokens seen (millions)")
    ax_loss.set_ylabel("val/loss (nats per token)")
    ax_bpb.plot(tokens, [r["val/bpb"] for r in rows], "o-", label="stories_tiny (128 validation blocks)")
    ax_bpb.axhline(REFERENCE_BPB, color="grey", linestyle="--", label="plain GPT after 15 min (1.49)")
    ax_bpb.set_xlabel("training tokens seen (millions)")
    ax_bpb.set_ylabel("val/bpb (bits per byte)")
    ax_bpb.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "val_curve.png", dpi=110)
    table = [
        {
            "step": int(s),
            "tokens_M": round(t, 2),
            "val_loss": round(r["val/loss"], 4),
            "val_bpb": round(r["val/bpb"], 4),
        }
        for s, t, r in zip(steps, tokens, rows, strict=True)
    ]
    (args.out / "val_curve.json").write_text(json.dumps(table, indent=1))
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
