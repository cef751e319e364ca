"""How the fast decoding step (:mod:`tiny_decoder.model.fast_decoding`) stores and multiplies its weights.

One entry per ``weights=`` choice of :func:`tiny_decoder.model.generation.generate`, each turning an
``nn.Linear``'s ``(N, K)`` weight into a callable ``(M, K) -> (M, N)`` (and ``residual + x W^T``):

* ``model`` (default): the model's own dtype, the weight stored transposed ``(K, N)`` and multiplied with
  ``torch.mm`` / ``torch.addmm`` (the residual add fused in). Same numerics as ``nn.Linear`` up to the
  summation order. At batch 1 on a CPU this is measured ~1.4x faster than ``F.linear``'s ``x @ W.t()``
  (``benchmarks/generation.py``); it holds a second copy of the matrices (the model's stay untouched).
* ``bf16`` (opt-in, changes numerics): bfloat16 weights, the matrix products' inputs cast to bfloat16, and a
  bfloat16 KV cache with attention in bfloat16 (half the bytes a step reads from the cache: attention is most of
  a step at batch 32); the residual stream, norms and rotary stay in the model's dtype. On a CPU with oneDNN the weights
  are prepacked for its bf16 kernels (AVX-512 BF16 / AMX where the CPU has it), elsewhere (and in the compiled
  step, whose compiler takes plain tensors only: ``portable``) ``F.linear``.
* ``int8`` (opt-in, changes numerics): int8 weights with one scale per output row (symmetric, absmax / 127),
  bfloat16 inputs to the products (as ``bf16``; the KV cache and attention stay in the model's dtype), through
  torch's own weight-only kernel
  ``aten._weight_int8pack_mm`` (a CPU kernel; torchao's int8 weight-only CPU path calls the same op). A
  quarter of the fp32 weight bytes, which is what bounds decoding at small sizes.
* ``int4`` (opt-in, changes numerics more: +0.005 validation bits per byte on the TinyStories record model):
  int4 weights in groups of 32 inputs, each group asymmetric (its minimum to its maximum in 15 steps), bfloat16
  inputs, through torch's ``aten._weight_int4pack_mm_for_cpu`` (the kernel torchao's int4 weight-only CPU layout
  calls). An eighth of the fp32 weight bytes: the fastest batch-1 format (benchmarks/RESULTS.md).

The quality cost of ``bf16`` / ``int8`` / ``int4`` on a trained model (greedy-token agreement with fp32, change of the
log-probability of fp32's tokens) is measured by ``benchmarks/generation.py --quality CKPT`` and reported in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.core.registry import Registry


class Kernel:
    """``x (M, K) -> x W^T + b (M, N)`` in one weight format; :meth:`add_to` also adds a residual."""

    traceable = True  # torch.jit.trace can hold its tensors as constants (not oneDNN's opaque packed weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + x W^T + b``."""
        return residual + self(x)


class TransposedKernel(Kernel):
    """The model's dtype, ``W^T`` contiguous: ``mm`` / ``addmm`` (module doc: ``model``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight_t = weight.detach().to(dtype).t().contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            residual = residual + self.bias
        return torch.addmm(residual, x, self.weight_t)


class LowPrecisionKernel(Kernel):
    """Multiplies in ``compute`` dtype: the input cast down, the output cast back to the input's dtype (the
    residual stream, norms and rotary stay in the model's dtype)."""

    compute = torch.bfloat16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.low(x.to(self.compute)).to(x.dtype)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self.low(x.to(self.compute))

    def low(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OneDNNKernel(LowPrecisionKernel):
    """bfloat16 weights prepacked for oneDNN's CPU GEMMs (``mkldnn._linear_pointwise``)."""

    traceable = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.compute).contiguous(), 1)
        self.bias = None if bias is None else bias.detach().to(self.compute)

    def low(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class LinearKernel(LowPrecisionKernel):
    """``F.linear`` on bfloat16 weights (bf16 off a CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight = weight.detach().to(self.compute).contiguous()
        self.bias = None if bias is None else bias.detach().to(self.compute)

    def low(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q (N, K) int8, scale (N,) fp32)`` with ``weight ~= q * scale[:, None]``."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Kernel(LowPrecisionKernel):
    """int8 weights, per-row scales, bfloat16 activations: ``aten._weight_int8pack_mm``."""

    # the kernel reads the inner dimension in blocks of 16 (other sizes give wrong results or crash): pad to it
    BLOCK = 16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.pad = -weight.shape[1] % self.BLOCK
        self.weight, scale = quantize_int8(F.pad(weight.detach(), (0, self.pad)))
        self.scale = scale.to(self.compute)
        self.bias = None if bias is None else bias.detach().to(self.compute)

    def low(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (0, self.pad))
        out = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        return out if self.bias is None else out + self.bias


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of ``group`` inputs (each group's min to max in 15 steps): ``(q (N, K) int32 in
    0..15, scale (N, K / group), minimum (N, K / group))`` with ``weight ~= q * scale + minimum`` per group."""
    weight = weight.detach().float()
    groups = weight.view(weight.shape[0], -1, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view_as(weight), scale, low


class Int4Kernel(LowPrecisionKernel):
    """int4 weights in groups of 32 inputs (asymmetric: a scale and a minimum each), bfloat16 activations:
    ``aten._weight_int4pack_mm_for_cpu`` (the kernel torchao's int4 weight-only CPU layout calls), on the weight
    packed by ``aten._convert_weight_to_int4pack_for_cpu``."""

    GROUP = 32  # the kernel takes groups of 32, 64, 128 or 256 inputs; 32 divides every d_model a multiple of 32
    ROWS = 16  # the packing takes outputs in multiples of 16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.outputs = weight.shape[0]
        self.pad = -weight.shape[1] % self.GROUP
        padded = F.pad(weight.detach(), (0, self.pad, 0, -weight.shape[0] % self.ROWS))
        q, scale, low = quantize_int4(padded, self.GROUP)
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # the kernel's (K / group, N, 2) pairs: w = (q - 8) * scale + zero, so zero = minimum + 8 * scale
        self.scale_and_zero = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).to(self.compute).contiguous()
        self.bias = None if bias is None else bias.detach().to(self.compute)

    def low(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (0, self.pad))
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.GROUP, self.scale_and_zero)
        if out.shape[1] != self.outputs:
            out = out[:, : self.outputs]
        return out if self.bias is None else out + self.bias


KernelFactory = Callable[[torch.Tensor, torch.Tensor | None, torch.dtype], Kernel]


class WeightFormat:
    """A ``weights=`` choice: the kernel built for each matrix."""

    name = "model"

    def __init__(self, portable: bool = False):
        # portable: only kernels of plain tensors that a compiler can take (:mod:`~tiny_decoder.model.compiled_step`)
        self.portable = portable

    def kernel_type(self, device: torch.device) -> KernelFactory:
        return TransposedKernel

    def check(self, device: torch.device) -> None:
        """Raise a one-line ConfigError if this format cannot run on ``device``."""

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype, in which attention runs (the model's, except for ``bf16``)."""
        return model_dtype

    def kernel(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Kernel:
        return self.kernel_type(weight.device)(weight, bias, dtype)


WEIGHT_FORMATS: Registry[type[WeightFormat]] = Registry("weights", group="weights")


@WEIGHT_FORMATS.register("model")
class ModelWeights(WeightFormat):
    """The model's dtype and numerics (the default)."""


@WEIGHT_FORMATS.register("bf16")
class BF16Weights(WeightFormat):
    """bfloat16 weights, activations of the products, KV cache and attention (opt-in)."""

    name = "bf16"

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def kernel_type(self, device: torch.device) -> KernelFactory:
        if device.type == "cpu" and torch.backends.mkldnn.is_available() and not self.portable:
            return OneDNNKernel
        return LinearKernel


class CPUWeightOnly(WeightFormat):
    """A weight-only quantized format through one of torch's CPU kernels (``kernel_class``): CPU only."""

    kernel_class: KernelFactory

    def kernel_type(self, device: torch.device) -> KernelFactory:
        return self.kernel_class

    def check(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ConfigError(f"weights={self.name} runs on a CPU only (torch's {self.name} weight-only CPU kernel); "
                              f"got {device}: use weights=bf16 or weights=model there")  # fmt: skip


@WEIGHT_FORMATS.register("int8")
class Int8Weights(CPUWeightOnly):
    """int8 weight-only (opt-in), bfloat16 activations, CPU only."""

    name = "int8"
    kernel_class = Int8Kernel


@WEIGHT_FORMATS.register("int4")
class Int4Weights(CPUWeightOnly):
    """int4 weight-only in groups of 32 (opt-in), bfloat16 activations, CPU only."""

    name = "int4"
    kernel_class = Int4Kernel


def weight_format(name: str, portable: bool = False) -> WeightFormat:
    """The :class:`WeightFormat` registered as ``name`` (an unknown name: one line listing the choices)."""
    return WEIGHT_FORMATS.get(name)(portable)
