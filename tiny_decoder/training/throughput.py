"""Speed in every run's logs: `ThroughputMFU`, Lightning's ThroughputMonitor with the two figures it needs for
model FLOPs utilisation, so ``train/device/mfu`` appears next to tokens/s (``train/items_per_sec``) without a
benchmark.

- FLOPs of a batch (`training_flops`): PaLM's estimate, ``6 N`` per token for a training step (forward and
  backward over all N parameters) plus ``12 L d T`` for attention (L layers of width d at sequence length T);
  an evaluation batch is a third of that (forward only).
- Peak FLOP/s of the device (`peak_flops`): ``peak_flops`` when given; else Lightning's table of accelerators
  (``get_available_flops``: GPUs and TPUs by name and precision); else, on a CPU, measured once per process and
  dtype by timing back-to-back square matmuls (:data:`PEAK_MATMUL_SIZE`, ~0.3 s): the sustained rate this
  machine reaches now, so MFU on a CPU reads "of the best this CPU does on a thick matmul".
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

if TYPE_CHECKING:
    from tiny_decoder.model import DecoderTransformer

log = logging.getLogger(__name__)

PEAK_MATMUL_SIZE = 1024
PEAK_MATMUL_SECONDS = 0.3
TRAINING_FLOPS_FACTOR = 3  # backward ~ 2x forward


def forward_flops_per_token(parameters: int, n_layers: int, d_model: int, sequence_length: int) -> float:
    """``2 N + 4 L d T``: every weight once (multiply-add) and the attention scores and mix over T positions."""
    return 2 * parameters + 4 * n_layers * d_model * sequence_length


def training_flops(pl_module: L.LightningModule, batch: Any, training: bool = True) -> float:
    """The model FLOPs of one batch (``batch["input"]``: (batch, T) token ids) for a training or evaluation step."""
    model = cast("DecoderTransformer", pl_module.model)  # every task of this project holds one
    batch_size, length = batch["input"].shape[:2]
    per_token = forward_flops_per_token(model.num_parameters(), model.config.n_layers, model.config.d_model, length)
    return per_token * batch_size * length * (TRAINING_FLOPS_FACTOR if training else 1)


def matmul_seconds(
    dtype: torch.dtype, size: int, seconds: float, device_type: str = "cpu", minimum: int = 3
) -> list[float]:
    """Wall seconds of each back-to-back ``size`` x ``size`` matmul in ``dtype`` over ``seconds`` (at least
    ``minimum`` of them, after three warm-up products), sorted; queued GPU work is waited for."""
    a = torch.randn(size, size, device=device_type).to(dtype)
    b = torch.randn(size, size, device=device_type).to(dtype)

    def synchronize() -> None:
        if device_type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < minimum:
        synchronize()
        started = time.perf_counter()
        a @ b
        synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)


@functools.cache
def measured_matmul_flops(dtype: torch.dtype, device_type: str = "cpu") -> float:
    """Sustained FLOP/s of back-to-back PEAK_MATMUL_SIZE square matmuls in ``dtype`` (median of ~0.3 s)."""
    times = matmul_seconds(dtype, PEAK_MATMUL_SIZE, PEAK_MATMUL_SECONDS, device_type)
    return 2 * PEAK_MATMUL_SIZE**3 / times[len(times) // 2]


class ThroughputMFU(ThroughputMonitor):
    """ThroughputMonitor that knows each batch's FLOPs (`training_flops`) and the device's peak (the module
    docstring): it logs ``<stage>/device/flops_per_sec`` and ``<stage>/device/mfu`` besides samples and items
    (tokens) per second. ``peak_flops``: FLOP/s per device, null for Lightning's table or a CPU measurement."""

    def __init__(self, *args: Any, peak_flops: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        peak = self.peak_flops or self.available_flops
        if peak is None and device.type == "cpu":
            dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
            peak = measured_matmul_flops(dtype)
            log.info("MFU: of the measured %s matmul rate on this CPU, %.1f GFLOP/s", dtype, peak / 1e9)
        self.available_flops = int(peak) if peak else None
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        training = trainer.training
        flops = training_flops(pl_module, batch, training)
        setattr(pl_module, "flops_per_batch", flops)  # noqa: B010  # what the monitor reads (mypy: Module's setattr)
        super()._update(trainer, pl_module, batch, iter_num)
