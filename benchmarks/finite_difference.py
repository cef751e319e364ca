"""Zeroth-order training on the sequence task: loss curves, peak memory, batched-perturbation speedup.

    OMP_NUM_THREADS=1 python benchmarks/finite_difference.py --out experiments/finite_difference/results.jsonl
    python benchmarks/finite_difference.py --plot experiments/finite_difference/results.jsonl

Prints one JSON object per line (also written to ``--out``) and a summary table; ``--plot`` draws
``loss_vs_step.png`` and ``loss_vs_time.png`` beside the JSONL from those records alone.

Sections (``kind`` of each record):

- ``pilot`` / ``curve`` / ``final``: every mode (backprop AdamW, SPSA, n-SPSA n=4 and n=16, coordinate-wise
  with 16 sampled coordinates a step, hybrid = n-SPSA(4) then AdamW at half the budget) trains the same
  freshly initialised model on the same stream of batches of 32 phase-1 sequences, with the sequence
  task's loss (distance-weighted cross-entropy, ``expected`` prediction, alpha 0.1). Each mode's learning
  rate is the best of a 3-value grid after ``--pilot-steps`` steps (the ``pilot`` records). Held-out loss
  (512 sequences) every ``--eval-every`` steps; wall time counts training steps only.
- ``memory``: peak bytes of one steady-state training step, per mode, on the benchmark model and on the
  repo's default ``seq_small`` (183k parameters). Method: ``torch.profiler`` with ``profile_memory=True``
  records every allocation and free of torch's CPU allocator; the running sum over the step, sorted by
  time, gives the peak of live tensor bytes above the start of the step. ``total`` adds what was already
  live and belongs to training (parameters, gradients, optimizer state); ratios are against an inference
  forward (``no_grad`` forward + loss) and against the backprop step. It counts tensor bytes, not the
  process's RSS (which includes the allocator's cache and Python, and cannot resolve ~100 kB deltas).
- ``speedup``: wall time of one gradient estimate with the perturbations evaluated one by one in place
  (``parallel=sequential``) vs batched with ``functional_call`` under ``vmap`` (median of ``--repeats``).
- ``smoothness``: the SPSA projected gradient at initialisation with the card's ``argmax`` prediction vs
  ``expected``: the argmax-weighted loss is piecewise constant in the weights, so a difference that crosses
  an argmax flip is a jump (divided by 2 eps), not a slope.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiny_decoder.data.sequences import generate_sequences
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.tasks.base import parameter_groups
from tiny_decoder.training.losses import distance_weighted_cross_entropy
from tiny_decoder.training.zeroth_order import ZerothOrderOptimizer

BATCH, SEQ_LEN, PHASE1 = 32, 8, (1.0, 0.0, 0.0)
MODELS = {
    # the benchmark model: learned token embeddings, 1 layer of width 8 (5,048 parameters)
    "tok8": dict(vocab_size=256, context_length=SEQ_LEN, d_model=8, n_layers=1, n_heads=2, d_ff=32,
                 attention={"name": "standard"}),
    # the repo's default sequence model (conf/model/seq_small.yaml with the default parts)
    "seq_small": dict(vocab_size=256, context_length=SEQ_LEN, d_model=64, n_layers=3, n_heads=4, d_ff=256),
}  # fmt: skip
BACKPROP = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def loss_of(model: DecoderTransformer, values: torch.Tensor, prediction: str = "expected") -> torch.Tensor:
    return distance_weighted_cross_entropy(model(values[:, :-1]), values[:, 1:], 0.1, "linear", prediction)


def build(name: str) -> DecoderTransformer:
    torch.manual_seed(0)
    return DecoderTransformer(ModelConfig.from_dict(MODELS[name]))


def sequences(seed: int, n: int) -> torch.Tensor:
    return generate_sequences(np.random.default_rng(seed), n, SEQ_LEN, PHASE1).values


# --------------------------------------------------------------------------------------------------
# Modes: how one training step is taken


@dataclass
class Mode:
    """A training mode: finite-difference options (None: backprop), its LR grid, and the hybrid switch."""

    name: str
    zeroth_order: dict[str, Any] | None
    grid: tuple[float, ...]
    switch_fraction: float | None = None
    lr: float | None = None
    notes: str = ""


MODES = [
    Mode("backprop", None, (3e-3, 1e-2, 3e-2), notes="AdamW, grad clip 1.0"),
    Mode("spsa", {"directions": 1}, (1e-4, 3e-4, 1e-3), notes="MeZO: 1 direction, in place"),
    Mode("nspsa4", {"directions": 4, "parallel": "vmap", "chunk_size": 8}, (1e-3, 3e-3, 1e-2)),
    Mode("nspsa16", {"directions": 16, "parallel": "vmap", "chunk_size": 32}, (3e-3, 1e-2, 3e-2)),
    Mode(
        "coordinate",
        {"estimator": "coordinate", "coordinates": 16, "parallel": "vmap", "chunk_size": 32},
        (0.1, 0.3, 1.0),
        notes="16 random coordinates a step",
    ),
    Mode("hybrid", {"directions": 4, "parallel": "vmap", "chunk_size": 8}, (), 0.5, notes="nspsa4, AdamW at 50%"),
]


def make_optimizer(mode: Mode, model: DecoderTransformer, lr: float, steps: int, backprop_lr: float) -> Any:
    adamw = torch.optim.AdamW
    if mode.zeroth_order is None:
        return adamw(parameter_groups(model), **{**BACKPROP, "lr": lr})
    hybrid = None
    if mode.switch_fraction is not None:
        backprop = lambda groups: adamw(groups, **{**BACKPROP, "lr": backprop_lr})  # noqa: E731
        hybrid = {"switch_step": int(steps * mode.switch_fraction), "backprop": backprop}
    options = {"seed": 0, **mode.zeroth_order, "hybrid": hybrid}
    return ZerothOrderOptimizer(parameter_groups(model), lr=lr, **options).bind(model)


@dataclass
class Trainer:
    """Steps one model with one mode (finite differences, backprop, or the hybrid's switch between them)."""

    model: DecoderTransformer
    optimizer: Any
    backprop: torch.optim.Optimizer | None = None
    steps: dict[str, Callable[[torch.Tensor], float]] = field(init=False)

    def __post_init__(self) -> None:
        self.steps = {"finite_difference": self._finite_difference, "backprop": self._backprop}
        if isinstance(self.optimizer, ZerothOrderOptimizer) and self.optimizer.hybrid.uses_backprop:
            self.backprop = self.optimizer.hybrid.backprop(self.optimizer.backprop_groups())
        elif not isinstance(self.optimizer, ZerothOrderOptimizer):
            self.backprop = self.optimizer

    def phase(self, step: int) -> str:
        if isinstance(self.optimizer, ZerothOrderOptimizer):
            return self.optimizer.hybrid.phase_at(step)
        return "backprop"

    def step(self, step: int, batch: torch.Tensor) -> float:
        return self.steps[self.phase(step)](batch)

    def _finite_difference(self, batch: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.optimizer.step(lambda: loss_of(self.model, batch)))

    def _backprop(self, batch: torch.Tensor) -> float:
        self.backprop.zero_grad(set_to_none=True)
        loss = loss_of(self.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.backprop.step()
        return loss.item()


def train(mode: Mode, lr: float, steps: int, eval_every: int, data: dict[str, torch.Tensor], backprop_lr: float):
    """Yields a record every ``eval_every`` steps: mean training loss since the last one, held-out loss."""
    model = build("tok8")
    trainer = Trainer(model, make_optimizer(mode, model, lr, steps, backprop_lr))
    wall, losses = 0.0, []
    yield _record(mode, lr, 0, wall, None, model, data["eval"])
    for step in range(steps):
        batch = data["train"][step * BATCH : (step + 1) * BATCH]
        started = time.perf_counter()
        losses.append(trainer.step(step, batch))
        wall += time.perf_counter() - started
        if (step + 1) % eval_every == 0:
            yield _record(mode, lr, step + 1, wall, sum(losses) / len(losses), model, data["eval"])
            losses = []


def _record(mode: Mode, lr: float, step: int, wall: float, train_loss: float | None, model, held_out) -> dict:
    with torch.no_grad():
        eval_loss = float(loss_of(model, held_out))
    return {"mode": mode.name, "lr": lr, "step": step, "wall_s": round(wall, 4), "train_loss": train_loss,
            "eval_loss": eval_loss}  # fmt: skip


def pilot(mode: Mode, steps: int, data: dict[str, torch.Tensor], emit: Callable[[dict], None]) -> float:
    """The grid value with the lowest held-out loss after ``steps`` steps."""
    finals = {}
    for lr in mode.grid:
        *_, last = train(mode, lr, steps, steps, data, BACKPROP["lr"])
        finals[lr] = last["eval_loss"] if np.isfinite(last["eval_loss"]) else float("inf")
        emit({"kind": "pilot", **last})
    return min(finals, key=finals.get)


# --------------------------------------------------------------------------------------------------
# Memory


def peak_allocated_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live CPU-allocator bytes while ``fn`` runs, above the level at its start (torch profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def resident_bytes(model: DecoderTransformer, optimizers: list[torch.optim.Optimizer]) -> int:
    """Parameters, their gradients and every tensor of the optimizers' state."""
    tensors = {id(p): p for p in model.parameters()}
    tensors.update({id(p.grad): p.grad for p in model.parameters() if p.grad is not None})
    for optimizer in optimizers:
        for state in optimizer.state.values():
            values = state.values() if isinstance(state, dict) else []
            tensors.update({id(v): v for v in values if isinstance(v, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


MEMORY_MODES = {
    "spsa": {"directions": 1},
    "nspsa16 (sequential)": {"directions": 16},
    "nspsa16 (vmap, chunk 16)": {"directions": 16, "parallel": "vmap", "chunk_size": 16},
    "coordinate (vmap, chunk 16)": {"estimator": "coordinate", "coordinates": 16, "parallel": "vmap"},
    "spsa + seed momentum": {"momentum": 0.9, "history": 8},
    "spsa + dense momentum": {"momentum": 0.9, "momentum_mode": "buffer"},
}


def memory(model_name: str) -> Iterator[dict]:
    batch = sequences(7, BATCH)
    model = build(model_name)

    def inference() -> None:
        with torch.no_grad():
            loss_of(model, batch)

    inference()  # warm-up, as for every mode below
    rows = {"inference": (resident_bytes(model, []), peak_allocated_bytes(inference))}
    adamw = torch.optim.AdamW(parameter_groups(model), lr=1e-4)
    backprop = Trainer(model, adamw)
    backprop.step(0, batch)  # AdamW state and gradients exist from now on, as in any later step
    rows["backprop (AdamW)"] = (resident_bytes(model, [adamw]), peak_allocated_bytes(lambda: backprop.step(1, batch)))
    model.zero_grad(set_to_none=True)
    for name, options in MEMORY_MODES.items():
        zo = ZerothOrderOptimizer(parameter_groups(model), lr=1e-6, seed=0, **options).bind(model)
        trainer = Trainer(model, zo)
        trainer.step(0, batch)
        rows[name] = (resident_bytes(model, [zo]), peak_allocated_bytes(lambda t=trainer: t.step(1, batch)))
    inference_total = sum(rows["inference"])
    backprop_total = sum(rows["backprop (AdamW)"])
    parameters = sum(p.numel() for p in model.parameters())
    for name, (resident, peak) in rows.items():
        total = resident + peak
        yield {
            "kind": "memory",
            "model": model_name,
            "parameters": parameters,
            "mode": name,
            "resident_bytes": resident,
            "peak_step_bytes": peak,
            "total_bytes": total,
            "vs_inference": round(total / inference_total, 3),
            "vs_backprop": round(total / backprop_total, 3),
        }


# --------------------------------------------------------------------------------------------------
# Batched vs sequential perturbations


SPEEDUP_MODELS = (("tok8", None), ("seq_small", None), ("seq_small", {"attention": {"name": "standard"}}))
SPEEDUP_CASES = {
    "nspsa16": {"directions": 16},
    "coordinate64": {"estimator": "coordinate", "coordinates": 64},
}


def speedup(model_name: str, repeats: int, overrides: dict[str, Any] | None = None) -> Iterator[dict]:
    config = {**MODELS[model_name], **(overrides or {})}
    torch.manual_seed(0)
    model = DecoderTransformer(ModelConfig.from_dict(config))
    batch = sequences(7, BATCH)
    label = model_name + "".join(f" {part}={value['name']}" for part, value in (overrides or {}).items())
    for case, options in SPEEDUP_CASES.items():
        times = {}
        for parallel, chunk in (("sequential", 1), ("vmap", 16), ("vmap", 32)):
            zo = ZerothOrderOptimizer(model.parameters(), seed=0, parallel=parallel, chunk_size=chunk, **options)
            zo.bind(model)
            times[(parallel, chunk)] = _median_time(lambda z=zo: z.estimate(lambda: loss_of(model, batch)), repeats)
            zo._pending = None
        base = times[("sequential", 1)]
        for (parallel, chunk), seconds in times.items():
            yield {"kind": "speedup", "model": label, "case": case, "parallel": parallel, "chunk_size": chunk,
                   "evaluations": 2 * (16 if case == "nspsa16" else 64), "seconds": round(seconds, 5),
                   "speedup": round(base / seconds, 2)}  # fmt: skip


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.no_grad():
            fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


# --------------------------------------------------------------------------------------------------
# Smoothness of the loss (argmax vs expected prediction)


def smoothness(directions: int = 64) -> Iterator[dict]:
    model = build("tok8")
    batch = sequences(7, BATCH)
    for prediction in ("argmax", "expected"):
        zo = ZerothOrderOptimizer(model.parameters(), seed=0, directions=directions, eps=1e-3)
        with torch.no_grad():
            zo.estimate(lambda p=prediction: loss_of(model, batch, p))
        projected = zo._pending[3].abs()
        zo._pending = None
        yield {"kind": "smoothness", "prediction": prediction, "directions": directions, "eps": 1e-3,
               "median_abs_projected_grad": round(float(projected.median()), 4),
               "max_abs_projected_grad": round(float(projected.max()), 4)}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Driver, table, plots


def run(args: argparse.Namespace) -> list[dict]:
    records: list[dict] = []
    out = open(args.out, "w") if args.out else None  # noqa: SIM115

    def emit(record: dict) -> None:
        records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit(
        {
            "kind": "config",
            "command": " ".join(sys.argv),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "pilot_steps": args.pilot_steps,
            "batch": BATCH,
            "model": MODELS["tok8"],
            "parameters": sum(p.numel() for p in build("tok8").parameters()),
        }
    )
    data = {"train": sequences(0, BATCH * args.steps), "eval": sequences(1, 512)}
    for mode in MODES:
        mode.lr = pilot(mode, args.pilot_steps, data, emit) if mode.grid else None
    backprop_lr = MODES[0].lr
    for mode in MODES:
        lr = mode.lr if mode.lr is not None else next(m.lr for m in MODES if m.name == "nspsa4")
        for record in train(mode, lr, args.steps, args.eval_every, data, backprop_lr):
            emit({"kind": "curve", **record})
        hybrid_lr = backprop_lr if mode.switch_fraction else None
        emit({"kind": "final", **record, "notes": mode.notes, "backprop_lr": hybrid_lr})
    for record in smoothness():
        emit(record)
    for model_name in ("tok8", "seq_small"):
        for record in memory(model_name):
            emit(record)
    for model_name, overrides in SPEEDUP_MODELS:
        for record in speedup(model_name, args.repeats, overrides):
            emit(record)
    if out:
        out.close()
    return records


def table(records: list[dict]) -> str:
    lines = ["mode         lr        eval loss (start -> end)   train wall s   s/step"]
    starts = {r["mode"]: r["eval_loss"] for r in records if r["kind"] == "curve" and r["step"] == 0}
    for r in (r for r in records if r["kind"] == "final"):
        lines.append(f"{r['mode']:<12} {r['lr']:<9.0e} {starts[r['mode']]:7.3f} -> {r['eval_loss']:7.3f}"
                     f"          {r['wall_s']:8.1f}   {r['wall_s'] / r['step']:.4f}")  # fmt: skip
    lines.append("\nmodel      mode                          total kB   vs inference   vs backprop")
    for r in (r for r in records if r["kind"] == "memory"):
        lines.append(f"{r['model']:<10} {r['mode']:<29} {r['total_bytes'] / 1024:8.1f}   {r['vs_inference']:12.2f}"
                     f"   {r['vs_backprop']:11.2f}")  # fmt: skip
    lines.append("\nmodel                              case          parallel   chunk   seconds   speedup")
    for r in (r for r in records if r["kind"] == "speedup"):
        lines.append(f"{r['model']:<34} {r['case']:<13} {r['parallel']:<10} {r['chunk_size']:>5}"
                     f"   {r['seconds']:7.4f}   {r['speedup']:6.2f}x")  # fmt: skip
    for r in (r for r in records if r["kind"] == "smoothness"):
        lines.append(f"\nprediction={r['prediction']}: |projected grad| median {r['median_abs_projected_grad']}, "
                     f"max {r['max_abs_projected_grad']} over {r['directions']} directions")  # fmt: skip
    return "\n".join(lines)


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    curves: dict[str, list[dict]] = {}
    for r in (r for r in records if r["kind"] == "curve"):
        curves.setdefault(r["mode"], []).append(r)
    axes = (("step", "loss_vs_step.png", "training step"), ("wall_s", "loss_vs_time.png", "training wall time (s)"))
    for x, filename, label in axes:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for mode, rows in curves.items():
            axis.plot([r[x] for r in rows], [r["eval_loss"] for r in rows], label=f"{mode} (lr {rows[0]['lr']:g})")
        axis.set_xlabel(label)
        axis.set_ylabel("held-out loss (512 sequences)")
        axis.set_title("Sequence task, 5k-parameter model: finite differences vs backprop")
        if x == "wall_s":
            axis.set_xscale("log")
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path.parent / filename, dpi=120)
        plt.close(figure)
    print(table(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON lines here too")
    parser.add_argument("--plot", type=Path, help="draw the figures from this JSONL (and print its table); no run")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--pilot-steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        return
    torch.set_num_threads(1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    records = run(args)
    print(table(records))


if __name__ == "__main__":
    main()
