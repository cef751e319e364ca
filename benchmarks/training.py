"""Training throughput: the Lightning path vs a hand-written PyTorch loop, per attention / precision / compile.

    python benchmarks/training.py                                   # stories15M and stories260K shapes, defaults
    python benchmarks/training.py --experiment stories15m --attention sdpa standard linformer longformer \\
        --precision 32-true bf16-mixed --compile false true        # the grid

For every setting, in one process and side by side (Lightning, loop, Lightning, loop, ... ``--repeats``):

- **lightning**: ``tiny_decoder.run.build.build_run`` of ``+experiment=NAME`` with the setting's overrides (batch
  ``--batch-size``, no gradient accumulation, no validation) and the recipe's callbacks and loggers, i.e. what
  ``python -m tiny_decoder.train`` runs; ``trainer.fit`` for ``--warmup + --steps`` optimizer steps.
- **loop**: the same model (same init), data loader, AdamW parameter groups, LR schedule and gradient clipping
  in a minimal loop: forward + cross-entropy (under bf16 autocast for ``bf16-mixed``; the two compiled with
  ``torch.compile`` for ``compile=true``), backward, clip, step, ``zero_grad(set_to_none=True)``.

Tokens/s counts the ``--steps`` steps after ``--warmup`` (wall clock between the end of step ``warmup`` and the
end of the last step: data loading, hooks and logging included). Also per setting: the data module's time per
batch (iterating its train loader alone) as a share of the loop's step time, FLOPs per step (fwd + bwd, counted
by ``lightning.fabric.utilities.throughput.measure_flops``), the achieved FLOP/s (Lightning path) and the model
FLOPs utilisation against this machine's matmul FLOP/s in the run's precision (2048 x 2048, measured in the same
run, before and after each setting, averaged: ``mfu`` of the median rate, ``mfu_of_best_matmul`` of the best
single product; ``mfu_vs_fp32_peak`` of the fp32 median whatever the precision).
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import lightning as L
import torch
from benchkit import (
    SHARED_TEXT,
    SMOKE_OVERRIDES,
    device,
    emit,
    machine,
    matmul_flops,
    median,
    recipe_config,
    synchronize,
    table,
)
from hydra.utils import instantiate
from lightning.fabric.utilities.throughput import measure_flops

from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.run.build import build_run
from tiny_decoder.run.config_checks import build_model_config
from tiny_decoder.tasks.base import parameter_groups
from tiny_decoder.training.losses import next_token_cross_entropy

PATHS = ("lightning", "loop")


class StepClock(L.Callback):
    """Wall-clock time at the end of every training batch."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        synchronize()
        self.ends.append(time.perf_counter())


def run_overrides(args: argparse.Namespace, attention: str, precision: str, compile: bool, data: str) -> list[str]:
    """The command-line overrides of one benchmarked setting."""
    overrides = [
        f"data.files.train=[{data}]",
        "data.files.validation=null",
        f"data.batch_size={args.batch_size}",
        f"attention={attention}",
        f"precision={precision}",
        f"compile={str(compile).lower()}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.accumulate_grad_batches=1",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.max_time=null",
        "test=false",
    ]
    return overrides + list(SMOKE_OVERRIDES if args.smoke else ()) + list(args.override)


def tokens_per_second(ends: list[float], warmup: int, tokens_per_step: int) -> float:
    timed = ends[warmup - 1 :]  # from the end of the last warm-up step to the end of the last step
    return (len(timed) - 1) * tokens_per_step / (timed[-1] - timed[0])


def lightning_path(cfg) -> list[float]:
    clock = StepClock()
    run = build_run(cfg, extra_callbacks=[clock])
    run.trainer.fit(run.task, datamodule=run.datamodule)
    return clock.ends


def loop_path(cfg) -> list[float]:
    """The hand-written loop over the same model, data and optimizer (module doc)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = DecoderTransformer(ModelConfig.from_dict(build_model_config(cfg, datamodule))).to(device()).train()
    optimizer = instantiate(cfg.optimizer)(parameter_groups(model))
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=int(cfg.trainer.max_steps))
    clip = cfg.trainer.gradient_clip_val

    def loss_of(ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return next_token_cross_entropy(model(ids), target)

    if cfg.compile:
        loss_of = torch.compile(loss_of)
    autocast = torch.autocast(device().type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed")
    ends: list[float] = []
    for batch in datamodule.train_dataloader():
        ids, target = batch["input"].to(device()), batch["target"].to(device())
        with autocast:
            loss = loss_of(ids, target)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        synchronize()
        ends.append(time.perf_counter())
        if len(ends) == cfg.trainer.max_steps:
            break
    return ends


def data_seconds_per_batch(cfg, batches: int = 50) -> float:
    """Mean time to get one batch from the data module's train loader (setup done beforehand, not timed)."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    iterator = iter(datamodule.train_dataloader())
    next(iterator)
    start = time.perf_counter()
    n = 0
    for n, _ in enumerate(iterator, start=1):
        if n == batches:
            break
    return (time.perf_counter() - start) / max(n, 1)


def flops_per_step(cfg, model_config: dict[str, Any], batch_size: int) -> int:
    """Forward + backward FLOPs of one training batch (matmuls and attention), counted on the meta device."""
    with torch.device("meta"):
        model = DecoderTransformer(ModelConfig.from_dict(model_config))
        ids = torch.zeros(batch_size, model.config.context_length, dtype=torch.long)
    return measure_flops(model, lambda: model(ids), lambda logits: logits.float().logsumexp(-1).sum())


def matmul_rates() -> dict[str, float]:
    """This machine's fp32 and bf16 matmul FLOP/s now: median and best (benchkit.matmul_flops)."""
    (fp32, fp32_best), (bf16, bf16_best) = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    rates = {"fp32": fp32, "bf16": bf16, "fp32_best": fp32_best, "bf16_best": bf16_best}
    emit({"benchmark": "matmul", "size": 2048, **{f"{k}_gflops": round(v / 1e9, 1) for k, v in rates.items()}})
    return rates


def measure_setting(args, experiment: str, attention: str, precision: str, compile: bool) -> dict:
    cfg = recipe_config(experiment, run_overrides(args, attention, precision, compile, args.data))
    setting = {"experiment": experiment, "attention": attention, "precision": precision, "compile": compile,
               "overrides": " ".join(args.override)}  # fmt: skip
    tokens_per_step = args.batch_size * int(cfg.data.context_length)
    rates: dict[str, list[float]] = {path: [] for path in PATHS}
    loop_steps: list[float] = []
    before = matmul_rates()  # the machine's speed drifts (shared cores): measured around each setting
    for repeat in range(args.repeats):
        for path in PATHS:
            torch._dynamo.reset()  # each run compiles afresh (no warm caches from the previous run)
            ends = lightning_path(cfg) if path == "lightning" else loop_path(cfg)
            gc.collect()
            rate = tokens_per_second(ends, args.warmup, tokens_per_step)
            rates[path].append(rate)
            if path == "loop":
                loop_steps.append(tokens_per_step / rate)
            run = {"path": path, "repeat": repeat, "tokens_per_s": round(rate, 1), "steps": len(ends) - args.warmup}
            emit({"benchmark": "training_run", **setting, **run})
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    model_config = build_model_config(cfg, datamodule)
    flops = flops_per_step(cfg, model_config, args.batch_size)
    lightning, loop = median(rates["lightning"]), median(rates["loop"])
    step_s = median(loop_steps)
    data_s = data_seconds_per_batch(cfg)
    achieved = flops * lightning / tokens_per_step
    after = matmul_rates()
    peaks = {key: (before[key] + after[key]) / 2 for key in before}
    kind = "bf16" if precision.startswith("bf16") else "fp32"
    return emit({
        "benchmark": "training", **setting,
        "batch_size": args.batch_size, "context": int(cfg.data.context_length),
        "parameters": DecoderTransformer(ModelConfig.from_dict(model_config)).num_parameters(),
        "lightning_tokens_per_s": round(lightning, 1), "loop_tokens_per_s": round(loop, 1),
        "lightning_over_loop": round(lightning / loop, 3),
        "step_s": round(step_s, 4), "data_s_per_batch": round(data_s, 6), "data_share": round(data_s / step_s, 5),
        "flops_per_step": flops, "achieved_gflops": round(achieved / 1e9, 1),
        "mfu": round(achieved / peaks[kind], 3), "mfu_of_best_matmul": round(achieved / peaks[f"{kind}_best"], 3),
        "mfu_vs_fp32_peak": round(achieved / peaks["fp32"], 3), "matmul_gflops": round(peaks[kind] / 1e9, 1),
    })  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", nargs="+", default=["stories15m", "stories260k"])
    parser.add_argument("--attention", nargs="+", default=["sdpa"])
    parser.add_argument("--precision", nargs="+", default=["32-true"], choices=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", nargs="+", default=["false"], choices=["false", "true"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=1, help="Lightning/loop pairs per setting (median)")
    parser.add_argument("--data", default=str(SHARED_TEXT), help="training text (TinyStories format)")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    emit({"benchmark": "machine", **machine()})
    rows = [
        measure_setting(args, experiment, attention, precision, compile == "true")
        for experiment in args.experiment
        for attention in args.attention
        for precision in args.precision
        for compile in args.compile
    ]
    print()
    print(table(rows, COLUMNS))
    return rows


COLUMNS = [
    ("experiment", "shape"), ("attention", "attention"), ("precision", "precision"), ("compile", "compile"),
    ("lightning_tokens_per_s", "lightning tok/s"), ("loop_tokens_per_s", "loop tok/s"),
    ("lightning_over_loop", "ratio"), ("achieved_gflops", "GFLOP/s"), ("mfu", "MFU"),
    ("data_share", "data share"),
]  # fmt: skip


if __name__ == "__main__":
    main()
