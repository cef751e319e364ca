"""The int4 decoding step as one native loop: a whole token (and a greedy loop of tokens) in one parallel region.

At batch 1 on a CPU the compiled step (:mod:`~tiny_decoder.model.compiled_step`) spends a third of a 2-thread
token outside its products: one OpenMP region, one output allocation and one dispatch per operation (32 regions,
~55 allocations a token), the 80 tensors of the program's call, the idle thread waiting at each. This module runs
the same function, ``weights=int4``'s quantized matrices (the same int4 values: groups of 32 inputs, each its
minimum to its maximum in 15 steps), through one C++ loop (``native/int4_decoder.cpp``): every layer's products
split by rows and its attention by heads among the threads of a single parallel region, a barrier between phases,
no allocation, no Python between tokens of a greedy continuation. The products read the activations in fp32 (the
compiled int4 step casts them to bfloat16 for torch's kernel), so its logits are those of the int4 weights.

* It covers what the stories15M-style recipes build: pre-norm RMSNorm, RoPE, a SwiGLU feed-forward, no biases, a
  model width and attention width that are multiples of 32 (the hidden width any: ``down``'s inputs are padded to
  groups of 32 with zero weights, as ``weights=int4`` pads them), batch 1, fp32, CPU
  (:func:`native_problem` names what a model lacks; ``generate`` then uses the compiled step).
* The library is compiled from its source on first use with the C++ compiler the compiled step uses (~0.7 s;
  ``-O3 -march=native -fopenmp``) and kept in the project's cache (``decoding/``), keyed by the source, the flags,
  the compiler and the CPU's flags; later processes load it in milliseconds.
* Layout: each matrix ``(N, K)`` (K padded to a multiple of 32) as ``q (N, K/2)`` bytes, byte ``j`` of group ``g``
  holding input ``32g + j`` in its low nibble and ``32g + 16 + j`` in its high one, and ``sz (N, K/32, 2)``
  (scale, minimum) pairs; the caches ``(heads, context, head_dim)`` fp32 per layer, keys after rotary in the fast
  step's interleaved pairs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tiny_decoder.core.cache_dir import default_cache_dir
from tiny_decoder.model.compiled_step import compiler
from tiny_decoder.model.decoding_weights import TransposedKernel, quantize_int4
from tiny_decoder.model.fast_decoding import (
    PREPARED_WEIGHTS,
    PreparedWeights,
    _linears,
    fast_decoding_problem,
)
from tiny_decoder.model.feedforward import GatedFeedForward
from tiny_decoder.model.positional import RotaryPositional
from tiny_decoder.model.transformer import DecoderTransformer

log = logging.getLogger(__name__)


class NativeUnavailable(RuntimeError):
    """The loop's library could not be built here (no compiler, a compiler error): the message says why."""


SOURCE = Path(__file__).with_name("native") / "int4_decoder.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
GROUP = 32  # inputs per (scale, minimum) pair: weights=int4's groups
_library: ctypes.CDLL | None = None
_unavailable: NativeUnavailable | None = None  # why it did not build: not tried again in this process


def native_problem(model: nn.Module) -> str | None:
    """Why :class:`NativeInt4Decoder` cannot run ``model`` here (None: it can)."""
    problem = fast_decoding_problem(model)  # type: ignore[arg-type]
    if problem is not None:
        return problem
    assert isinstance(model, DecoderTransformer)
    blocks, weight = list(model.layers), model.head.weight
    gated = all(isinstance(b.ff, GatedFeedForward) and isinstance(b.ff.act, nn.SiLU) for b in blocks)
    first = blocks[0]
    widths = [model.config.d_model, first.attn.n_heads * first.attn.head_dim]  # the hidden width: padded to 32
    checks = {
        "a CPU": weight.device.type == "cpu",
        "fp32 weights": weight.dtype == torch.float32,
        "RoPE": isinstance(model.positional, RotaryPositional),
        "RMSNorm": all(isinstance(n, nn.RMSNorm) for b in blocks for n in (b.norm_attn, b.norm_ff, model.final_norm)),
        "a SwiGLU feed-forward": gated,
        "no biases": all(getattr(linear, "bias", None) is None for linear in _linears(model)),
        "model and attention widths that are multiples of 32": all(width % GROUP == 0 for width in widths),
        "the same heads in every layer": all(
            (b.attn.n_heads, b.attn.head_dim) == (first.attn.n_heads, first.attn.head_dim) for b in blocks
        ),
        "a C++ compiler": compiler() is not None,
        "a library that builds here": _unavailable is None,  # tried (and warned about) once a process
    }
    missing = [need for need, ok in checks.items() if not ok]
    return f"the native int4 decoder needs {', '.join(missing)}" if missing else None


def cpu_flags() -> str:
    """The CPU's feature flags where the system lists them (Linux), else its name: what ``-march=native`` reads."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "").strip()
    except OSError:
        return platform.processor()


def library() -> ctypes.CDLL:
    """The compiled loop, built into the cache on first use (~1 s; written under a temporary name and renamed, so
    a process never loads a partial file)."""
    global _library, _unavailable
    if _library is not None:
        return _library
    if _unavailable is not None:
        raise _unavailable
    try:
        _library = _build_and_load()
    except NativeUnavailable as error:
        _unavailable = error
        raise
    return _library


def _build_and_load() -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler ($CXX or g++)")
    source = SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    # -march=native: a cache shared between machines (a cluster's home) holds one build per kind of CPU
    settings = [cxx, *FLAGS, *version, platform.machine(), torch.backends.cpu.get_cpu_capability(), cpu_flags()]
    key = hashlib.sha256(b"\n".join([source, " ".join(settings).encode()])).hexdigest()[:24]
    path = default_cache_dir() / "decoding" / f"int4_decoder-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.tmp-{os.getpid()}.so")
        log.warning("building the native int4 decoder, once (~1 s); later runs load it from %s", path)
        built = subprocess.run([cxx, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
        if built.returncode != 0:
            partial.unlink(missing_ok=True)
            first = (built.stderr.strip().splitlines() or ["no message"])[0].replace(str(SOURCE), SOURCE.name)
            raise NativeUnavailable(f"{Path(cxx).name} could not build {SOURCE.name}: {first}")
        os.replace(partial, path)
    lib = ctypes.CDLL(str(path))
    lib.td_int4_decode.restype = ctypes.c_int
    pointer, number = ctypes.c_void_p, ctypes.c_int
    # (dims, eps, arrays, threads, tokens, feed, start, greedy, eos, out, logits): td_int4_decode's signature
    lib.td_int4_decode.argtypes = [pointer, pointer, pointer, number, pointer, number, number, number, number,
                                   pointer, pointer]  # fmt: skip
    return lib


def pack_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q (N, K'/2) uint8, sz (N, K'/32, 2) fp32)`` of an ``(N, K)`` matrix, ``K'`` = K rounded up to groups of 32
    (zero weights): :func:`quantize_int4`'s values (those of ``weights=int4``, which pads the same way), byte ``j``
    of a group holding input ``j`` low and ``16 + j`` high."""
    weight = F.pad(weight.detach(), (0, -weight.shape[1] % GROUP))
    rows, inputs = weight.shape
    q, scale, minimum = quantize_int4(weight, GROUP)
    groups = q.view(rows, inputs // GROUP, GROUP).to(torch.uint8)
    packed = groups[..., : GROUP // 2] | (groups[..., GROUP // 2 :] << 4)
    return packed.reshape(rows, inputs // 2).contiguous(), torch.stack([scale, minimum], dim=-1).contiguous()


class PackedModel:
    """Every array the loop reads, for one version of a model's weights (built from its fp32 fast-step weights:
    norms folded in, q / k rows in rotary pairs, gate and up stacked)."""

    def __init__(self, w: PreparedWeights):
        layer = w.layers[0]
        self.layers, self.heads, self.head_dim = len(w.layers), layer.n_heads, layer.head_dim
        self.context, self.vocab = w.context, w.vocab_size
        # td_int4_decode's dims: width, layers, heads, head size, hidden width, vocabulary, context
        sizes = [w.embedding.shape[1], self.layers, self.heads, self.head_dim, layer.hidden, self.vocab, self.context]
        self.dims = torch.tensor(sizes, dtype=torch.int64)
        eps = [e for lw in w.layers for e in (lw.norm_attn.eps, lw.norm_ff.eps)] + [w.final_norm.eps]
        self.eps = torch.tensor(eps, dtype=torch.float32)
        assert w.rotary is not None
        self.embedding, self.rotary = w.embedding.contiguous(), w.rotary.contiguous()

        def matrix(kernel: object) -> tuple[torch.Tensor, torch.Tensor]:
            assert isinstance(kernel, TransposedKernel)
            return pack_int4(kernel.weight_t.t())

        self.head = matrix(w.head)
        self.matrices = [matrix(getattr(lw, name)) for name in ("qkv", "proj", "up", "down") for lw in w.layers]

    def pointers(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """The loop's table of arrays (its order: td_int4_decode's)."""
        tensors = [self.embedding, self.rotary, *self.head]
        tensors += [t for pair in self.matrices for t in pair] + keys + values
        return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


_PACKED: weakref.WeakKeyDictionary[PreparedWeights, PackedModel] = weakref.WeakKeyDictionary()


class NativeInt4Decoder:
    """:class:`~tiny_decoder.model.fast_decoding.FastDecoder`'s interface (``decoder(ids)``, :meth:`greedy`,
    ``length``, :meth:`reset`) over the native loop, batch 1: its own KV cache, prompts fed token by token."""

    fast_loop = True  # greedy continuations run in the loop

    def __init__(self, model: DecoderTransformer):
        problem = native_problem(model)
        if problem is not None:
            raise ValueError(problem)
        w = PREPARED_WEIGHTS.get(model, "model")
        packed = _PACKED.get(w)
        if packed is None:
            packed = _PACKED[w] = PackedModel(w)
        self.packed, self.library = packed, library()
        shape = (packed.heads, packed.context, packed.head_dim)
        self.keys = [torch.zeros(shape) for _ in range(packed.layers)]
        self.values = [torch.zeros(shape) for _ in range(packed.layers)]
        self.table = packed.pointers(self.keys, self.values)
        self.logits = torch.zeros(1, packed.vocab)
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def _run(self, tokens: torch.Tensor, feed: int, greedy: int, eos_id: int | None, out: torch.Tensor) -> int:
        return self.library.td_int4_decode(
            self.packed.dims.data_ptr(), self.packed.eps.data_ptr(), self.table.data_ptr(), torch.get_num_threads(),
            tokens.data_ptr(), feed, self.length, greedy, -1 if eos_id is None else eos_id, out.data_ptr(),
            self.logits.data_ptr(),
        )  # fmt: skip

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, vocab)`` after appending ``ids (1, T)``."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"the native int4 decoder takes (1, T) ids, got {tuple(ids.shape)}")
        end = self.length + ids.shape[1]
        if end > self.packed.context:
            raise ValueError(f"the native decoder holds {self.packed.context} positions; appending would reach {end}")
        tokens = ids.to(torch.int64).contiguous()
        low, high = (int(bound) for bound in torch.aminmax(tokens))
        if low < 0 or high >= self.packed.vocab:  # the loop reads the embedding row unchecked
            raise IndexError(f"token ids must be in [0, {self.packed.vocab}), got {low}..{high}")
        self._run(tokens, tokens.shape[1], 0, None, tokens)
        self.length = end
        return self.logits.clone()

    def greedy(self, logits: torch.Tensor, count: int, eos_id: int | None = None) -> torch.Tensor:
        """``count`` greedy tokens ``(1, k)`` after ``logits`` (the last position's), each fed back in; ``k < count``
        once one equals ``eos_id`` (it is the last)."""
        if self.length + count - 1 > self.packed.context:
            raise ValueError(f"the native decoder holds {self.packed.context} positions; {count} greedy tokens "
                             f"after {self.length} would reach {self.length + count - 1}")  # fmt: skip
        self.logits.copy_(logits)
        out = torch.empty(count, dtype=torch.int64)
        written = self._run(out, 0, count, eos_id, out)
        self.length += max(written - 1, 0)
        return out[:written].view(1, -1)
