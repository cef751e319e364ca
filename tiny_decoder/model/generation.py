"""Autoregressive decoding with the KV cache: greedy, temperature, top-k and top-p sampling.

The model always sees at most its last ``context_length`` tokens (nanoGPT's crop). While the sequence
fits, each step feeds only the newest token through the cache; once it overflows, each step re-encodes
the cropped window (positions restart at 0, as in training).

Four ways to run a step (:func:`generate`'s ``use_cache`` / ``fast`` / ``compile``):

* recompute: the whole (cropped) sequence every step, no cache;
* fast (the default): :class:`~tiny_decoder.model.fast_decoding.FastDecoder`, eager, no compilation: the
  weights laid out for decoding and a step of a few large ops, in the format ``weights`` names (``model``: the
  model's numerics; ``bf16`` / ``int8`` / ``int4`` opt-in, :mod:`~tiny_decoder.model.decoding_weights`); past the
  context it re-encodes the cropped window through the same step. Models it does not cover fall back to ``cached``;
* cached (``fast=False``): a :class:`~tiny_decoder.model.cache.KVCache` through the model's own modules, eager;
* compiled (``compile=True``): on a CPU, the fast step with its one-token steps as one AOTInductor program
  (:mod:`~tiny_decoder.model.compiled_step`: compiled once per model shape, weight format, batch size and thread
  count, kept on disk, loaded in milliseconds by later runs; the fastest mode, ``benchmarks/RESULTS.md``).
  ``compile="auto"`` (the generate tool's default) takes it where it pays (:func:`compiles_auto`: a program
  already compiled, or a call of at least 64 new tokens), else the fast eager step. With ``weights=int4`` at
  batch 1 it is instead the native loop of :mod:`~tiny_decoder.model.native_decoder` (a whole token, and a whole
  greedy continuation, in one parallel region; the same int4 weights, the activations in fp32), for the models
  it covers (:func:`~tiny_decoder.model.native_decoder.native_problem`).
  Off a CPU, and for models the fast step does not cover (or with ``fast=False``): a
  :class:`~tiny_decoder.model.cache.StaticKVCache` and a ``torch.compile``'d one-token step of the module path
  with the weights frozen into the graph, compiled in every process and recompiled when the weights change in
  place.

Greedy decoding through the fast step, where the continuation fits the context, runs in the decoder's own loop
(:meth:`~tiny_decoder.model.fast_decoding.FastDecoder.greedy`: each argmax written where the next one-token step
reads its ids) instead of the per-token loop of :func:`generate`, whose selection, buffer writes and slicing cost
~0.05 ms a token beside a ~0.5 ms compiled step at 2 threads. Sampling draws from the softmax by inverse CDF
(:func:`sample`), one uniform number per row.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Protocol

import torch

from tiny_decoder.model.cache import KVCache
from tiny_decoder.model.fast_decoding import PREPARED_WEIGHTS, FastDecoder, fast_decoding_problem, weight_versions
from tiny_decoder.model.transformer import DecoderTransformer

if TYPE_CHECKING:
    from tiny_decoder.model.native_decoder import NativeInt4Decoder

log = logging.getLogger(__name__)


class Step(Protocol):
    """``step(tokens buffer, tokens so far) -> (B, V)`` next-token logits, run inside ``step.mode()``."""

    def __call__(self, tokens: torch.Tensor, n: int) -> torch.Tensor: ...

    def mode(self) -> AbstractContextManager: ...

    def greedy(self, logits: torch.Tensor, n: int, count: int, eos_id: int | None) -> torch.Tensor | None:
        """The ``count`` greedy tokens ``(B, k)`` after ``logits`` (those after ``n`` tokens), ``k < count`` once
        every row emitted ``eos_id``, decoded in one loop of this step's own; None: this step has no such loop
        (``generate``'s loop then)."""
        ...


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row, set the rest to ``-inf``."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability mass reaches ``p``."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= p  # mass before this token already >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def select_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` token ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return sample(torch.softmax(logits, dim=-1), generator)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of ``probs (B, V)``, drawn with probability ``probs``: inverse-CDF sampling, one uniform
    draw per row against the running sum (in float64) of the row. The same distribution as ``torch.multinomial``,
    which draws an exponential per vocabulary entry (~2.5 ms a step at batch 32 x 4096 on a CPU core, against
    ~0.2 ms). ``right=True`` never lands on a zero-probability entry (top-k / top-p filtered)."""
    cumulative = probs.cumsum(dim=-1, dtype=torch.float64)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    ids = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True)
    return ids.squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate(
    model: DecoderTransformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool | str = False,
    fast: bool = True,
    weights: str = "model",
) -> torch.Tensor:
    """Continue ``prompt`` ``(B, T)`` by up to ``max_new_tokens``; returns ``(B, T + n)``.

    Rows that emitted ``eos_id`` keep emitting it; decoding stops once every row has. ``fast`` (default): the
    fast eager step in the ``weights`` format (module doc); ``compile=True``: the compiled step, which falls back
    to the eager cache, with a warning, for attentions that need the key count (linformer, longformer);
    ``compile="auto"`` (the generate tool's default): the compiled program where it pays (:func:`compiles_auto`),
    else the eager fast step. ``weights`` other than ``model`` need the fast step.
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (batch, length>0) token ids, got shape {tuple(prompt.shape)}")
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be true, false or auto, got {compile!r}")
    was_training = model.training
    model.eval()
    try:
        batch, prompt_length = prompt.shape
        tokens = torch.empty(batch, prompt_length + max_new_tokens, dtype=prompt.dtype, device=prompt.device)
        tokens[:, :prompt_length] = prompt
        if compile == "auto":
            compile = compiles_auto(model, batch, max_new_tokens, use_cache, fast, weights)
        step = _stepper(model, batch, use_cache, bool(compile), fast, weights)
        n = prompt_length
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
        with step.mode():
            logits = step(tokens, n)
            picked = step.greedy(logits, n, max_new_tokens, eos_id) if temperature <= 0 else None
            if picked is not None:
                tokens[:, n : n + picked.shape[1]] = picked
                return tokens[:, : n + picked.shape[1]]
            for _ in range(max_new_tokens):
                next_token = select_next_token(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    next_token = next_token.masked_fill(finished, eos_id)
                    finished |= next_token == eos_id
                tokens[:, n] = next_token
                n += 1
                if eos_id is not None and bool(finished.all()):
                    break
                if n < tokens.shape[1]:  # the last token needs no logits
                    logits = step(tokens, n)
        return tokens[:, :n]
    finally:
        model.train(was_training)


# compile="auto" compiles a program it does not find in the cache only for a call of at least this many new tokens:
# 15-25 s of compiling, once per shape, against ~0.3 ms a token saved (stories15M shape, 2-core CPU); a sequence
# task's handful of numbers decodes eagerly (or through a program already compiled)
AUTO_COMPILE_FROM_TOKENS = 64


def compiles_auto(
    model: DecoderTransformer, batch: int, max_new_tokens: int, use_cache: bool, fast: bool, weights: str
) -> bool:
    """What ``compile="auto"`` means for this call: the compiled program (True) on a CPU, for a model the fast
    step covers, where a C++ compiler is found and either the program is already compiled (loading it takes
    milliseconds) or the call decodes at least :data:`AUTO_COMPILE_FROM_TOKENS` tokens (it is compiled, once,
    said in one line), and always for ``weights=int4`` at batch 1 where the native loop covers the model (built in
    ~1 s); else the eager fast step (False). Off a CPU: the eager fast step (the compiled module step
    compiles again in every process)."""
    from tiny_decoder.model import compiled_step

    if fast_step_problem(model, use_cache, fast) is not None:
        return False
    if next(model.parameters()).device.type != "cpu" or not compiled_step.compiler_found():
        return False
    if max_new_tokens >= AUTO_COMPILE_FROM_TOKENS:
        return True
    if weights == "int4" and batch == 1:
        from tiny_decoder.model.native_decoder import native_problem

        if native_problem(model) is None:
            return True  # the native loop: its library builds in ~1 s, once, then loads in milliseconds
    return compiled_step.program_ready(PREPARED_WEIGHTS.get(model, weights, portable=True), batch)


def fast_step_problem(model: DecoderTransformer, use_cache: bool, fast: bool) -> str | None:
    """Why this call does not decode with the fast step (the switches that turn it off, or what the model has that
    it does not cover); None: it does."""
    switches = {"use_cache=False": not use_cache, "fast=False": not fast}
    return ", ".join(name for name, on in switches.items() if on) or fast_decoding_problem(model)


def _stepper(model: DecoderTransformer, batch: int, use_cache: bool, compile: bool, fast: bool, weights: str) -> Step:
    problem = fast_step_problem(model, use_cache, fast)
    if compile and problem is None and next(model.parameters()).device.type != "cpu":
        problem = "compile=True off a CPU (there the compiled module step)"
    if weights != "model" and problem is not None:
        raise ValueError(f"weights={weights} needs the fast decoding step (use_cache, fast): {problem}")
    if problem is None and compile:
        native = _native_decoder(model) if weights == "int4" and batch == 1 else None
        return Fast(model, native or _compiled_fast_decoder(model, batch, weights))
    if problem is None:
        return Fast(model, FastDecoder(PREPARED_WEIGHTS.get(model, weights), batch))
    if not use_cache:
        return Recompute(model)
    if compile and not model.supports_static_cache:
        log.warning("compile=true: this attention cannot use a static KV cache; decoding eagerly with the cache")
        compile = False
    if compile:
        return Cached(model, model.new_cache(batch, static=True), COMPILED_DECODING.step_for(model))
    return Cached(model, model.new_cache(batch), None)


def _compiled_fast_decoder(model: DecoderTransformer, batch: int, weights: str) -> FastDecoder:
    """The fast step with its one-token steps compiled (:mod:`~tiny_decoder.model.compiled_step`); the eager fast
    step, with a warning, where this machine cannot compile."""
    from tiny_decoder.model.compiled_step import CompileUnavailable, compiled_step

    prepared = PREPARED_WEIGHTS.get(model, weights, portable=True)
    try:
        return FastDecoder(prepared, batch, program=compiled_step(prepared, batch))
    except CompileUnavailable as error:
        log.warning("compile=true: %s; decoding with the eager fast step", error)
        return FastDecoder(PREPARED_WEIGHTS.get(model, weights), batch)


def _native_decoder(model: DecoderTransformer) -> NativeInt4Decoder | None:
    """The native int4 loop for ``model`` (None: a model it does not cover; with a warning, a library that does not
    build here: then the compiled program)."""
    from tiny_decoder.model.native_decoder import NativeInt4Decoder, NativeUnavailable, native_problem

    if native_problem(model) is not None:
        return None
    try:
        return NativeInt4Decoder(model)
    except NativeUnavailable as error:
        log.warning("compile=true weights=int4: %s; decoding with the compiled program", error)
        return None


class Recompute:
    """Every step encodes the whole (cropped) sequence."""

    def __init__(self, model: DecoderTransformer):
        self.model = model
        self.context = model.config.context_length

    def mode(self) -> AbstractContextManager:
        """The grad mode the decoding loop runs in (``generate``'s no_grad: the module path may create tensors
        that training reads later, which inference mode would make unusable there)."""
        return nullcontext()

    def __call__(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        return self.model(tokens[:, max(0, n - self.context) : n])[:, -1]

    def greedy(self, logits: torch.Tensor, n: int, count: int, eos_id: int | None) -> torch.Tensor | None:
        return None  # generate's loop


class Cached(Recompute):
    """Feeds only the tokens the cache has not seen; ``one_token_step`` (compiled) runs the single-token steps.
    Past the context the cache is full: recompute the cropped window."""

    def __init__(self, model: DecoderTransformer, cache: KVCache, one_token_step: Callable | None):
        super().__init__(model)
        self.cache = cache
        self.one_token_step = one_token_step
        self.fed = 0  # tokens in the cache (a host counter: reading a static cache's position would sync)
        self.step_ids: torch.Tensor | None = None  # (B, 1) input of the compiled step: same strides every call

    def __call__(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        if n > self.context:
            return super().__call__(tokens, n)
        new = tokens[:, self.fed : n]
        self.fed = n
        if self.one_token_step is None or new.shape[1] != 1:
            return self.model(new, self.cache)[:, -1]
        if self.step_ids is None:  # a slice of `tokens` has its strides, which the compiled step would guard on
            self.step_ids = torch.empty_like(new, memory_format=torch.contiguous_format)
        return self.one_token_step(self.model, self.step_ids.copy_(new), self.cache)


class Fast:
    """The fast step (:class:`FastDecoder`): feeds the tokens its cache has not seen; past the context it
    re-encodes the cropped window through the same step."""

    def __init__(self, model: DecoderTransformer, decoder: FastDecoder | NativeInt4Decoder):
        self.decoder = decoder
        self.context = model.config.context_length

    def mode(self) -> AbstractContextManager:
        """Inference mode over the whole loop: it skips autograd's bookkeeping (~1 us an op at these sizes), and
        entering it once instead of every step saves ~20 us a token (measured at 2 threads, stories15M shape). The
        fast step writes only its own caches, and ``tokens`` (made outside) stays a normal tensor."""
        return torch.inference_mode()

    def greedy(self, logits: torch.Tensor, n: int, count: int, eos_id: int | None) -> torch.Tensor | None:
        """The decoder's own greedy loop (:meth:`FastDecoder.greedy`) where its one-token steps are one call and
        the tokens fit the context (past it, each step re-encodes the cropped window: ``generate``'s loop)."""
        if not self.decoder.fast_loop or n + count - 1 > self.context:
            return None
        return self.decoder.greedy(logits, count, eos_id)

    def __call__(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        if n > self.context:
            self.decoder.reset()
            return self.decoder(tokens[:, n - self.context : n])
        return self.decoder(tokens[:, self.decoder.length : n])


def next_token_logits(model: DecoderTransformer, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """``(B, V)`` logits after feeding ``ids`` through ``cache``: the function compiled for decoding."""
    return model(ids, cache)[:, -1]


# inductor settings of the compiled step: weights as constants (freezing) so the GEMMs can prepack them, and
# max-autotune's GEMM templates (on a CPU its C++ micro-kernels: ~3-4x faster matrix-vector products than
# the BLAS calls of eager mode at batch 1)
INDUCTOR_OPTIONS: dict[str, bool | int | str] = {
    "freezing": True,
    "max_autotune": True,
    "autotune_num_choices_displayed": 0,  # no per-GEMM timing report on the console
    "max_autotune_report_choices_stats": False,
}
CPU_GEMM_BACKENDS = "CPP,ATEN"


def inductor_options(device: torch.device) -> dict[str, bool | int | str]:
    options = dict(INDUCTOR_OPTIONS)
    if device.type == "cpu":
        options["max_autotune_gemm_backends"] = CPU_GEMM_BACKENDS
    return options


class CompiledDecoding:
    """The compiled one-token step, shared by every :func:`generate` call (compilations are cached per model
    and shape by ``torch.compile``).

    Frozen weights are constants of the compiled graph, so they must not change under it: :meth:`step_for`
    records each model's weight versions and, when they moved (the model trained since), drops the compiled
    step to recompile. The inductor settings apply while a compilation runs; they are patched in only for the
    first call of a (model, shape) pair, since patching costs about a millisecond per call.
    """

    def __init__(self):
        self.compiled = torch.compile(next_token_logits, fullgraph=True, dynamic=False)
        self.versions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> weight versions
        self.warm: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> set of compiled shapes

    def step_for(self, model: DecoderTransformer) -> Callable:
        versions = weight_versions(model)
        if self.versions.get(model, versions) != versions:
            log.info("compiled decoding: the weights changed since compilation; recompiling")
            self.reset()
        self.versions[model] = versions
        return self.call

    def call(self, model: DecoderTransformer, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        shape = (tuple(ids.shape), ids.device, cache.keys[0].dtype, cache.max_length, torch.is_autocast_enabled())
        warm = self.warm.setdefault(model, set())
        if shape in warm:
            return self.compiled(model, ids, cache)
        warm.add(shape)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(inductor_options(ids.device)):
            return self.compiled(model, ids, cache)

    def reset(self) -> None:
        """Forget every compiled step (the next call of each model compiles again)."""
        from torch._dynamo.eval_frame import reset_code

        reset_code(next_token_logits.__code__)
        self.versions.clear()
        self.warm.clear()


COMPILED_DECODING = CompiledDecoding()
