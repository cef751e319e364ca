"""Post-training measurements and the report of ``experiments/compression/`` (``experiments/compression/run.sh``).

    OMP_NUM_THREADS=1 python benchmarks/compression.py measure outputs/compression --out experiments/compression
    python benchmarks/compression.py report outputs/compression --out experiments/compression

``measure`` reads the training runs under RUNS (``magnitude_<s>``, ``teacher``, ``student``, ``student_kd``,
``layerdrop``, ``early_exit``; each a ``python -m tiny_decoder.train`` run directory) and appends one JSON object
per measurement to ``<out>/measurements.jsonl`` (``kind``):

- ``magnitude``: zeros in the masks of each magnitude run's tested checkpoint (the sparsity actually reached).
- ``heads``: the teacher's heads ranked once by importance (``|dL/d gate|`` summed over 8 validation batches,
  per-layer L2-normalised, global ranking: Michel et al. 2019); for each number of removed heads the parameters,
  the forward latency of a ``(256, 8)`` batch with the heads removed and with them only masked (median over
  interleaved rounds, 1 thread), and the test metrics of the pruned model.
- ``early_exit``: the early-exit run at each confidence threshold, and as a control the static teacher read the
  same way (its intermediate layers were never trained to be read by the head): test metrics and layers per token.
- ``subnetwork``: fixed sub-networks (``keep_layers``) of the teacher, the LayerDrop run and the early-exit run.

Test metrics are those of ``trainer.test`` on the run's own test split (3000 sequences). ``report`` copies each
run's ``results.json``, ``csv/metrics.csv`` and ``.hydra/overrides.yaml`` to ``<out>/runs/<name>/`` and writes
``results.md`` (every table) and the plots from those files and ``measurements.jsonl`` alone (so
``report <out>/runs`` redraws them from the committed files).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tiny_decoder.model.depth import EarlyExit, LayerDrop
from tiny_decoder.run import run_dir as layout
from tiny_decoder.tasks import DecoderTask, load_task
from tiny_decoder.training.pruning import gate_heads, head_importance, heads_to_keep, prune_heads

METRICS = ("test/loss", "test/acc", "test/acc_last", "test/mad", "test/layers_per_token")
HEADS_REMOVED = (0, 2, 4, 6, 8, 10, 12)
THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 2.0)
SUBNETWORKS = ([0, 1, 2, 3], [0, 1, 2], [0, 1, 3], [0, 2], [1, 3], [0, 1], [0])
LATENCY_BATCH, LATENCY_ROUNDS, LATENCY_REPEATS = (256, 8), 40, 5
RUN_FILES = (layout.RESULTS, layout.METRICS, layout.OVERRIDES)

# --------------------------------------------------------------------------------------------------------
# Loading and evaluating a run
# --------------------------------------------------------------------------------------------------------


def load_run(run_dir: Path) -> tuple[DecoderTask, L.LightningDataModule]:
    """The tested checkpoint of a run (its ``best_checkpoint``) and the run's data module."""
    results = json.loads((run_dir / "results.json").read_text())
    task = load_task(results["best_checkpoint"])
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return task, instantiate(config.data, _convert_="all")


def test_metrics(task: DecoderTask, datamodule: L.LightningDataModule) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    [metrics] = trainer.test(task, datamodule=datamodule, verbose=False)
    return {name: round(float(metrics[name]), 5) for name in METRICS if name in metrics}


def forward_latency_ms(models: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Median ms of one forward of a ``LATENCY_BATCH`` batch per model, rounds interleaved across the models
    (so a busy neighbour on the shared CPU slows them all alike)."""
    ids = torch.randint(0, 256, LATENCY_BATCH)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()(ids)  # warm-up
        for _ in range(LATENCY_ROUNDS):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(LATENCY_REPEATS):
                    model(ids)
                times[name].append((time.perf_counter() - start) / LATENCY_REPEATS * 1000)
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------


def magnitude_runs(runs: Path) -> list[str]:
    """``magnitude_<s>`` (local) then ``magnitude_global_<s>``, each by sparsity."""
    names = [p.parent.name for p in runs.glob("magnitude_*/results.json")]
    return sorted(names, key=lambda name: ("global" in name, target_of(name)))


def target_of(name: str) -> float:
    return float(name.rsplit("_", 1)[1])


def measure_magnitude(runs: Path) -> Iterable[dict[str, Any]]:
    for name in magnitude_runs(runs):
        results = json.loads((runs / name / "results.json").read_text())
        state = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
        masks = [m for k, m in state.items() if k.endswith("_mask")]
        zeros = sum(int((m == 0).sum()) for m in masks)
        yield {"kind": "magnitude", "run": name, "masked_weights": sum(m.numel() for m in masks), "zeros": zeros}


def measure_heads(runs: Path) -> Iterable[dict[str, Any]]:
    task, datamodule = load_run(runs / "teacher")
    datamodule.setup("validate")
    batches = list(islice(iter(datamodule.val_dataloader()), 8))
    importance = head_importance(task.model, task.loss, batches)
    yield {"kind": "head_importance", "importance": [[round(float(s), 5) for s in layer] for layer in importance]}
    pruned, masked, kept = {}, {}, {}
    for removed in HEADS_REMOVED:
        kept[removed] = heads_to_keep(importance, removed, "global", normalize=True)
        pruned[removed] = copy.deepcopy(task)
        prune_heads(pruned[removed].model, kept[removed])
        masked[removed] = copy.deepcopy(task.model)
        gate_heads(masked[removed], kept[removed])
    latency = forward_latency_ms(
        {f"p{k}": m.model for k, m in pruned.items()} | {f"m{k}": m for k, m in masked.items()}
    )
    for removed, model in pruned.items():
        yield {
            "kind": "heads",
            "removed": removed,
            "kept": kept[removed],
            "parameters": model.model.num_parameters(),
            "latency_ms": latency[f"p{removed}"],
            "masked_latency_ms": latency[f"m{removed}"],
            **test_metrics(model, datamodule),
        }


def measure_early_exit(runs: Path) -> Iterable[dict[str, Any]]:
    for source in ("early_exit", "teacher"):
        task, datamodule = load_run(runs / source)
        task.model.depth = EarlyExit(task.model_config, threshold=0.0)  # the teacher: read the same way
        for threshold in THRESHOLDS:
            task.model.depth.threshold = threshold
            yield {"kind": "early_exit", "run": source, "threshold": threshold, **test_metrics(task, datamodule)}


def measure_subnetworks(runs: Path) -> Iterable[dict[str, Any]]:
    for source in ("teacher", "layerdrop", "early_exit"):
        task, datamodule = load_run(runs / source)
        for layers in SUBNETWORKS:
            task.model.depth = LayerDrop(task.model_config, keep_layers=layers)
            yield {"kind": "subnetwork", "run": source, "keep_layers": layers, **test_metrics(task, datamodule)}


MEASUREMENTS: dict[str, Callable[[Path], Iterable[dict[str, Any]]]] = {
    "magnitude": measure_magnitude,
    "heads": measure_heads,
    "early_exit": measure_early_exit,
    "subnetwork": measure_subnetworks,
}


def measure(runs: Path, out: Path) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "measurements.jsonl", "w") as handle:
        for name, measurement in MEASUREMENTS.items():
            started = time.perf_counter()
            for record in measurement(runs):
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                print(json.dumps(record), flush=True)
            print(f"# {name}: {time.perf_counter() - started:.1f} s", flush=True)


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def copy_runs(runs: Path, out: Path) -> Path:
    """The runs' own logs under ``<out>/runs`` (unless they are already there)."""
    target = out / "runs"
    if runs.resolve() == target.resolve():
        return target
    for run_dir in sorted(p.parent for p in runs.glob("*/results.json")):
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                destination = target / run_dir.name / Path(name).name
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run_dir / name, destination)
    return target


def read_results(runs: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(runs.glob("*/results.json"))}


def read_measurements(out: Path) -> list[dict[str, Any]]:
    lines = (out / "measurements.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def validation_curve(run_dir: Path, key: str = "val/loss") -> tuple[list[int], list[float]]:
    with open(run_dir / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(key)]
    return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def markdown(header: list[str], rows: Iterable[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def test_cells(record: dict[str, Any]) -> list[Any]:
    return [record.get(k, float("nan")) for k in ("test/loss", "test/acc", "test/acc_last", "test/mad")]


TEST_HEADER = ["test loss", "test acc", "test acc_last", "test mad"]


def magnitude_table(results: dict[str, dict], measurements: list[dict]) -> str:
    rows = []
    for mask in (m for m in measurements if m["kind"] == "magnitude"):
        run = results[mask["run"]]
        reached = mask["zeros"] / mask["masked_weights"] if mask["masked_weights"] else 0.0
        scope = "global" if "global" in mask["run"] else "local"
        head = [scope, target_of(mask["run"]), reached, run["parameters"] - mask["zeros"], run["val"]["val/loss"]]
        rows.append(head + test_cells(run["test"]) + [run["wall_time_s"]])
    return markdown(["scope", "target", "reached", "non-zero params", "val loss", *TEST_HEADER, "wall s"], rows)


def heads_table(measurements: list[dict]) -> str:
    rows = [
        [m["removed"], m["kept"], m["parameters"], m["latency_ms"], m["masked_latency_ms"], *test_cells(m)]
        for m in measurements
        if m["kind"] == "heads"
    ]
    header = ["heads removed", "kept per layer", "params", "forward ms", "masked forward ms", *TEST_HEADER]
    return markdown(header, rows)


DISTILLATION_RUNS = {
    "teacher": ["teacher"],
    "student": ["student", "student_seed1", "student_seed2"],
    "student_kd": ["student_kd", "student_kd_seed1", "student_kd_seed2"],
}


def mean_and_spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{values[0]:.4g}"


def distillation_table(results: dict[str, dict]) -> str:
    rows = []
    for group, names in DISTILLATION_RUNS.items():
        runs = [results[name] for name in names if name in results]
        columns = zip(*([r["val"]["val/loss"], *test_cells(r["test"])] for r in runs), strict=True)
        wall = round(statistics.fmean(r["wall_time_s"] for r in runs), 1)
        rows.append([group, len(runs), runs[0]["parameters"], *(mean_and_spread(list(c)) for c in columns), wall])
    return markdown(["run", "seeds", "params", "val loss", *TEST_HEADER, "wall s (mean)"], rows)


def early_exit_table(measurements: list[dict]) -> str:
    rows = [
        [m["run"], m["threshold"], m.get("test/layers_per_token"), *test_cells(m)]
        for m in measurements
        if m["kind"] == "early_exit"
    ]
    return markdown(["run", "threshold", "layers / token", *TEST_HEADER], rows)


def subnetwork_table(measurements: list[dict]) -> str:
    records = [m for m in measurements if m["kind"] == "subnetwork"]
    runs = list(dict.fromkeys(m["run"] for m in records))
    by_key = {(m["run"], tuple(m["keep_layers"])): m for m in records}
    rows = []
    for layers in dict.fromkeys(tuple(m["keep_layers"]) for m in records):
        row: list[Any] = [list(layers)]
        for run in runs:
            m = by_key.get((run, layers), {})
            row += [m.get("test/loss", float("nan")), m.get("test/acc_last", float("nan"))]
        rows.append(row)
    header = ["keep_layers"] + [f"{run} {metric}" for run in runs for metric in ("loss", "acc_last")]
    return markdown(header, rows)


def plot(runs: Path, results: dict[str, dict], measurements: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, final) = plt.subplots(1, 2, figsize=(11, 4))
    names = magnitude_runs(runs)
    for name in (n for n in names if "global" not in n):
        curves.plot(*validation_curve(runs / name), marker="o", label=f"{target_of(name):.0%}")
    curves.set(xlabel="step", ylabel="val loss", title="magnitude pruning (local): validation loss")
    curves.legend(title="target sparsity")
    for scope in ("local", "global"):
        chosen = [n for n in names if ("global" in n) == (scope == "global")]
        xs = [target_of(n) for n in chosen]
        final.plot(xs, [results[n]["test"]["test/acc"] for n in chosen], marker="o", label=f"{scope}: test acc")
        final.plot(xs, [results[n]["test"]["test/acc_last"] for n in chosen], marker="s", label=f"{scope}: acc_last")
    final.set(xlabel="sparsity of the Linear weights", ylabel="test accuracy", title="at the end of training")
    final.legend()
    figure.tight_layout()
    figure.savefig(out / "magnitude_sparsity.png", dpi=110)

    heads = [m for m in measurements if m["kind"] == "heads"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    removed = [m["removed"] for m in heads]
    axes[0].plot(removed, [m["parameters"] for m in heads], marker="o")
    axes[0].set(xlabel="heads removed (of 16)", ylabel="parameters")
    axes[1].plot(removed, [m["latency_ms"] for m in heads], marker="o", label="removed")
    axes[1].plot(removed, [m["masked_latency_ms"] for m in heads], marker="s", label="masked only")
    axes[1].set(xlabel="heads removed (of 16)", ylabel="forward ms, batch 256x8")
    axes[1].legend()
    axes[2].plot(removed, [m["test/loss"] for m in heads], marker="o")
    axes[2].set(xlabel="heads removed (of 16)", ylabel="test loss")
    figure.tight_layout()
    figure.savefig(out / "head_pruning.png", dpi=110)

    figure, axis = plt.subplots(figsize=(6, 4))
    for run in ("early_exit", "teacher"):
        points = [m for m in measurements if m["kind"] == "early_exit" and m["run"] == run]
        xs = [m["test/layers_per_token"] for m in points]
        axis.plot(xs, [m["test/acc"] for m in points], marker="o", label=f"{run} (thresholds)")
    axis.set(xlabel="average layers per token", ylabel="test accuracy", title="early exit")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "early_exit.png", dpi=110)


def report(runs_dir: Path, out: Path) -> None:
    runs = copy_runs(runs_dir, out)
    results, measurements = read_results(runs), read_measurements(out)
    sections = [
        ("Magnitude pruning (3 layers x 64, each Linear weight to the target)", magnitude_table(results, measurements)),
        (
            "Head pruning of the teacher (4 layers x 4 heads, global, Michel et al. importance)",
            heads_table(measurements),
        ),
        ("Distillation", distillation_table(results)),
        ("Early exit", early_exit_table(measurements)),
        ("Fixed sub-networks (keep_layers)", subnetwork_table(measurements)),
    ]
    text = "\n\n".join(f"## {title}\n\n{table}" for title, table in sections)
    (out / "results.md").write_text(
        "# Compression results (generated by benchmarks/compression.py report)\n\n" + text + "\n"
    )
    plot(runs, results, measurements, out)
    print(text)


STAGES: dict[str, Callable[[Path, Path], None]] = {"measure": measure, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("runs", type=Path, help="directory holding the training runs (or <out>/runs for report)")
    parser.add_argument("--out", type=Path, default=Path("experiments/compression"))
    args = parser.parse_args()
    STAGES[args.stage](args.runs, args.out)


if __name__ == "__main__":
    main()
