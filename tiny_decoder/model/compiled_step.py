"""The fast decoding step compiled ahead of time (AOTInductor) and kept on disk, keyed by what it computes.

``generate(..., compile=True)`` on a CPU (``compile=true`` of the ``generate`` tool, and its default
``compile=auto`` where it pays: :func:`~tiny_decoder.model.generation.compiles_auto`) runs the one-token step of
:mod:`~tiny_decoder.model.fast_decoding` (:func:`~tiny_decoder.model.fast_decoding.one_token_logits`, the same
function) as one compiled C++ program: no Python and no dispatcher between its ops, the norms, rotary and softmax
fused into loops, the matrix products in inductor's C++ GEMM micro-kernels where its autotuning measures them
faster than the BLAS call. Prompts still run through the eager fast step, into the same KV cache.

* Every tensor the step reads is an input of the program, the weights too, so one program serves every
  checkpoint of a shape. Its key (:func:`program_key`, computed in ~1 ms without tracing the step) hashes the
  source of the step's modules, every setting of its layers, norms and kernels (eps, head sizes, the activation,
  flags), its inputs' shapes, strides and dtypes (the weight format, the batch size), the thread count the
  kernels were generated for, torch's version and the CPU's vector capability.
* The first run of a shape exports and compiles (15-25 s on a 2-core CPU; one log line says so, where the program
  goes and that ``compile=false`` skips it); later runs, in any process, load it in milliseconds.
  Programs are written under a temporary name and renamed; one that does not load is compiled again, with a
  warning. A machine without a C++ compiler decodes with the eager fast step: with a warning under
  ``compile=true``, silently under ``compile=auto`` (:func:`compiler_found`).
* Attention reads the cache slots up to the position only (a size the program reads from its position input), so
  one program serves every position.
* Where: ``decoding/`` in the project's cache (``$TINY_DECODER_CACHE``, else ``~/.cache/tiny_decoder``, beside the
  token caches). Deleting it only costs the next run its compilation.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn

from tiny_decoder.core.cache_dir import default_cache_dir
from tiny_decoder.model import decoding_weights, fast_decoding
from tiny_decoder.model.fast_decoding import (
    CacheWindow,
    OneTokenProgram,
    PreparedWeights,
    new_caches,
    one_token_logits,
)

log = logging.getLogger(__name__)

# bump when the program's inputs or calling convention change without its graph code changing
PROGRAM_VERSION = "1"
# inductor settings of the compilation: autotuned GEMMs (its C++ micro-kernels against aten's), quietly
INDUCTOR_OPTIONS: dict[str, bool | int | str] = {
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


def step_holders(w: PreparedWeights) -> list[object]:
    """Every object whose attributes the one-token step reads (the weights, each layer, norm and kernel), in a
    fixed order."""
    holders: list[object] = [w, w.final_norm, w.head]
    for layer in w.layers:
        holders += [layer, layer.norm_attn, layer.norm_ff, layer.qkv, layer.proj, layer.up, layer.down]
    return holders


def tensor_slots(w: PreparedWeights) -> list[tuple[object, str]]:
    """``(holder, attribute)`` of every tensor the one-token step reads, in a fixed order."""
    holders = step_holders(w)
    return [(holder, name) for holder in holders for name, value in vars(holder).items() if torch.is_tensor(value)]


class StepProgram(nn.Module):
    """:func:`one_token_logits` with every tensor it reads as an input: ``(ids (B, 1), position (1,), keys,
    values, tensors) -> logits (B, vocab)``: ``keys`` / ``values`` each layer's ``(B, H, context, D)`` cache
    (written in place), attention over its slots up to ``position``, ``tensors`` the :func:`tensor_slots` of
    ``weights``, put in their places for the call."""

    def __init__(self, weights: PreparedWeights):
        super().__init__()
        self.weights = weights
        self.slots = tensor_slots(weights)

    def forward(
        self,
        ids: torch.Tensor,
        position: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        tensors: list[torch.Tensor],
    ) -> torch.Tensor:
        saved = [getattr(holder, name) for holder, name in self.slots]
        try:
            for (holder, name), tensor in zip(self.slots, tensors, strict=True):
                setattr(holder, name, tensor)
            # attention over slots 0..position: a size read from the data (an "unbacked" size), so the program
            # holds no assumption about it (a dynamic input size got pinned to the context by stride checks)
            slots = cast(int, position.item()) + 1  # an unbacked SymInt under export (int() would pin it)
            torch._check(slots >= 1)
            torch._check(slots <= keys[0].shape[2])
            windows = [t for k, v in zip(keys, values, strict=True) for t in CacheWindow(k, v, slots).tensors()]
            return one_token_logits(self.weights, ids, position, windows)
        finally:
            for (holder, name), tensor in zip(self.slots, saved, strict=True):
                setattr(holder, name, tensor)


class CompiledStep:
    """A loaded program bound to one set of weights: ``step(ids, position, keys, values) -> logits``."""

    def __init__(self, loader, tensors: list[torch.Tensor], path: Path, cache: torch.Tensor):
        self.loader, self.tensors, self.path = loader, tensors, path
        self.cache_layout = (tuple(cache.shape), cache.dtype, cache.device)

    def check_caches(self, caches: Sequence[torch.Tensor]) -> None:
        """The program reads and writes its inputs as laid out when compiled (it checks nothing itself: another
        dtype or shape would be read and written out of bounds)."""
        for cache in caches:
            layout = (tuple(cache.shape), cache.dtype, cache.device)
            if layout != self.cache_layout or not cache.is_contiguous():
                raise ValueError(f"KV cache {layout} does not fit the compiled step's {self.cache_layout}")

    def __call__(
        self,
        ids: torch.Tensor,
        position: torch.Tensor,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        # the loader's own entry point, without the pytree round trip of AOTICompiledModel.__call__ (~40 us)
        return self.loader.boxed_run([ids, position, *keys, *values, *self.tensors])[0]


class CompileUnavailable(RuntimeError):
    """This machine could not compile the step (no C++ compiler, a compiler error): the message says why."""


LOADED: dict[str, object] = {}  # key -> loaded program, for this process
UNAVAILABLE: dict[str, CompileUnavailable] = {}  # key -> why it did not compile: not tried again in this process


def example_inputs(w: PreparedWeights, batch: int) -> tuple:
    device = w.embedding.device
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position = torch.zeros(1, dtype=torch.long, device=device)
    keys, values = new_caches(w, batch)
    return ids, position, keys, values, [getattr(holder, name) for holder, name in tensor_slots(w)]


# the files whose code the program computes (their source is part of the key): the step, its weight formats and
# the program's calling convention (this file)
STEP_SOURCES = (fast_decoding, decoding_weights, sys.modules[__name__])


def described(value: object) -> str | None:
    """What a non-tensor attribute of a step's holder adds to the computation (None: nothing, or a holder listed
    on its own): numbers, flags and shapes by value, modules (the activation) by class and settings."""
    if isinstance(value, (bool, int, float, str, type(None), tuple, torch.dtype, torch.device)):
        return repr(value)
    if isinstance(value, nn.Module):
        return f"{type(value).__module__}.{type(value).__qualname__}:{value!r}"
    if isinstance(value, decoding_weights.WeightFormat):
        return type(value).__qualname__  # its kernels are holders, keyed by class (program_key)
    return None  # the kernels, norms and layers (holders themselves), the step's caches of traces and programs


def source_of(module: object) -> str:
    """A module's source; where there is none to read (a frozen install), its name and the package's version."""
    try:
        return inspect.getsource(module)  # type: ignore[arg-type]
    except (OSError, TypeError):
        from importlib.metadata import version

        return f"{getattr(module, '__name__', module)} of tiny_decoder {version('tiny_decoder')}"


def program_key(w: PreparedWeights, inputs: tuple) -> str:
    """What the compiled program depends on, hashed without tracing the step: the version of the calling
    convention, torch's version, the CPU's vector capability, the thread count and inductor settings the kernels
    were generated with, the source of the step's modules, every holder's class and non-tensor settings (eps,
    head sizes, the activation, flags: :func:`described`), and the shape, strides, dtype and device of every input
    (the weight format's tensors, the batch size, the caches); not the weights' values, which are inputs."""
    flat = [t for part in inputs for t in (part if isinstance(part, list) else [part])]
    holders = step_holders(w)
    settings = [type(holder).__qualname__ for holder in holders]  # the classes: which kernel, which norm
    settings += [
        f"{type(holder).__qualname__}.{name}={text}"
        for holder in holders
        for name, value in sorted(vars(holder).items())
        if (text := described(value)) is not None
    ]
    parts = [
        PROGRAM_VERSION,
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        f"threads={torch.get_num_threads()}",
        repr(sorted(INDUCTOR_OPTIONS.items())),
        *(source_of(module) for module in STEP_SOURCES),
        *settings,
        *(f"{tuple(t.shape)}/{t.stride()}/{t.dtype}/{t.device.type}" for t in flat),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def compiler() -> str | None:
    """The C++ compiler inductor would call (``$CXX``, else ``g++``; ``clang++`` on macOS), if it is on this machine
    (found without importing inductor); the native int4 loop is built with it too."""
    default = "clang++" if sys.platform == "darwin" else "g++"
    return shutil.which(os.environ.get("CXX") or default)


def compiler_found() -> bool:
    """Whether :func:`compiler` finds one."""
    return compiler() is not None


def program_path(w: PreparedWeights, inputs: tuple) -> tuple[str, Path]:
    """The key of ``w``'s program for ``inputs`` (:func:`program_key`) and where it is kept."""
    key = program_key(w, inputs)
    return key, default_cache_dir() / "decoding" / f"{key}.pt2"


def program_ready(w: PreparedWeights, batch: int) -> bool:
    """Whether ``w``'s program at ``batch`` rows is compiled already (in this process or on disk): loading it takes
    milliseconds."""
    if (batch, torch.get_num_threads()) in w.compiled:
        return True
    key, path = program_path(w, example_inputs(w, batch))
    return key in LOADED or path.exists()


def compile_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """AOTInductor-compile ``program`` into the package ``path`` (written under a temporary name, renamed)."""
    import torch._inductor.config as inductor_config

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.tmp-{os.getpid()}.pt2")
    log.warning(
        "compiling the decoding step for this model shape, once (15-25 s on a 2-core CPU; compile=false skips it); "
        "later runs load it from %s",
        path,
    )
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), inductor_config.patch(INDUCTOR_OPTIONS):
            warnings.simplefilter("ignore")  # inductor's notes on its own internals (TypedStorage, ...)
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
    except Exception as error:  # inductor raises many kinds (a missing compiler: InvalidCxxCompiler, ...)
        partial.unlink(missing_ok=True)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompileUnavailable(f"could not compile the decoding step ({type(error).__name__}: {reason})") from error
    os.replace(partial, path)
    log.info("compiled in %.1f s", time.perf_counter() - start)


def load_program(path: Path):
    """The package's runner: torch's C++ package loader, as ``aoti_load_package`` makes it, without importing
    inductor's Python side (measured 8 ms against 1.3 s, 0.9 s of which is that import)."""
    # (package, model name aoti_compile_and_package gives, run single-threaded, runners, device index: the default)
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)


def compiled_step(w: PreparedWeights, batch: int) -> OneTokenProgram:
    """The compiled one-token step of ``w`` at ``batch`` rows: loaded from the cache, else compiled into it."""
    slot = (batch, torch.get_num_threads())  # the program's kernels are generated for one thread count
    if slot in w.compiled:
        return w.compiled[slot]
    inputs = example_inputs(w, batch)
    key, path = program_path(w, inputs)
    loader = LOADED.get(key)
    if loader is None and path.exists():
        try:
            loader = load_program(path)
        except Exception as error:  # a truncated or foreign file: compile it again
            log.warning("compile=true: %s does not load (%s); compiling it again", path, str(error).splitlines()[0])
    if loader is None:
        if key in UNAVAILABLE:
            raise UNAVAILABLE[key]
        try:
            with torch.no_grad():
                program = torch.export.export(StepProgram(w), inputs, strict=False)
            compile_program(program, path)
        except CompileUnavailable as error:
            UNAVAILABLE[key] = error
            raise
        loader = load_program(path)
    LOADED[key] = loader
    step = CompiledStep(loader, inputs[-1], path, inputs[2][0])
    w.compiled[slot] = step
    return step
