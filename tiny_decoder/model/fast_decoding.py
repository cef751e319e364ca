"""The fast decoding step: the model's weights laid out for incremental decoding, run with a few large ops.

At the sizes this project trains (stories15M: d 288, 6 layers) a one-token step is bound by per-op overhead
and by reading the weights, not by arithmetic. The module path (``model(ids, cache)``) spends most of a step in
Python and in small ops (nn.Module calls, rotary's chunk / cat, separate gate / up projections, cache appends,
residual adds). :class:`FastDecoder` computes the same function from flat tensors, eagerly, no compilation:

* per layer ``norm -> qkv (one mm) -> rotary (one complex multiply, in place, on q and k together) -> k and v
  written into the cache -> attention -> out-projection with the residual added in (addmm) -> norm -> gate and
  up in one mm -> act * up -> down-projection + residual (addmm)``; logits only for the last position;
* q / k rows permuted per head from the rotate-half layout to interleaved pairs, so rotary is a complex
  multiply; the cached keys are in that order too (a dot product does not depend on the order of its terms,
  so the attention scores are unchanged);
* the cache of a layer is a ``(B, H, context, D)`` tensor of keys and one of values (:class:`FastDecoder`);
* one-token steps at batch sizes below ``EAGER_FROM_BATCH`` run as a TorchScript trace of the same calls
  (:func:`traced_step`: no Python between the aten calls; traced in ~0.05 s on first use, one trace per batch
  size and attention bucket of 64 cache slots, the slots past the position masked, attention as two batched
  products); prompts, larger batches (attention over exactly the cached slots) and formats whose weights cannot
  be trace constants (oneDNN's packed bf16) run eagerly;
* ``compile=True`` (:mod:`~tiny_decoder.model.compiled_step`) runs the same one-token function,
  :func:`one_token_logits`, as a compiled program instead of the trace;
* the matrices in a :mod:`~tiny_decoder.model.decoding_weights` format (``weights=model`` by default: same
  numerics as the module path up to summation order; ``bf16`` / ``int8`` / ``int4`` opt-in).

It covers the models most recipes build (:func:`fast_decoding_problem` names what it does not: then
``generate`` uses the module path). Prepared weights are cached per model and format, and rebuilt when the
model's weights change (training).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from tiny_decoder.model.attention import SDPAttention, StandardAttention
from tiny_decoder.model.decoding_weights import Kernel, WeightFormat, weight_format
from tiny_decoder.model.depth import StaticDepth
from tiny_decoder.model.embedding import TokenEmbedding
from tiny_decoder.model.feedforward import FeedForward, GatedFeedForward
from tiny_decoder.model.norm import PreNorm
from tiny_decoder.model.positional import LearnedPositional, NoPositional, RotaryPositional, SinusoidalPositional
from tiny_decoder.model.transformer import Block, DecoderTransformer

ADDITIVE_POSITIONAL = (NoPositional, LearnedPositional, SinusoidalPositional)


def fast_decoding_problem(model: DecoderTransformer) -> str | None:
    """Why ``model`` cannot use :class:`FastDecoder` (None: it can)."""
    if not isinstance(model, DecoderTransformer):
        return f"the fast decoding step needs a DecoderTransformer, got {type(model).__name__}"
    weight = next(model.parameters())
    checks = {
        "fp32 or fp64 weights": weight.dtype in (torch.float32, torch.float64),
        "autocast off (it would recast the fused products)": not torch.is_autocast_enabled(weight.device.type),
        "a token embedding": isinstance(model.embedding, TokenEmbedding),
        "static depth": type(model.depth) is StaticDepth,
        "pre-norm": isinstance(model.layers[0].residual, PreNorm),
        "rope, learned, sinusoidal or no positions": type(model.positional) in (RotaryPositional, *ADDITIVE_POSITIONAL),
        "sdpa or standard attention without head gates": all(
            type(block.attn) in (SDPAttention, StandardAttention) and block.attn.head_gate is None
            for block in model.layers
        ),
        "an MLP or gated feed-forward": all(
            type(block.ff) in (FeedForward, GatedFeedForward) for block in model.layers
        ),
        "plain nn.Linear projections and head": all(type(linear) is nn.Linear for linear in _linears(model)),
        "rmsnorm or layernorm": isinstance(model.final_norm, (nn.RMSNorm, nn.LayerNorm))
        and all(
            isinstance(norm, (nn.RMSNorm, nn.LayerNorm))
            for block in model.layers
            for norm in (block.norm_attn, block.norm_ff)
        ),
    }
    missing = [need for need, ok in checks.items() if not ok]
    return f"the fast decoding step needs {', '.join(missing)}" if missing else None


def _linears(model: DecoderTransformer) -> list[nn.Module | None]:
    """Every matrix the fast step reads, as the modules that hold it."""
    linears: list[nn.Module | None] = [model.head]
    for block in model.layers:
        linears += [getattr(block.attn, "qkv", None), getattr(block.attn, "proj", None)]
        linears += [getattr(block.ff, name, None) for name in ("gate", "up", "down") if hasattr(block.ff, name)]
    return linears


def interleaved_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order turning each head's rotate-half layout ``(x_0..x_{D/2-1}, y_0..)`` into pairs ``(x_0, y_0, ..)``."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return torch.cat([within + h * head_dim for h in range(n_heads)])


class Norm:
    """A norm without its affine part (folded into the next matrix, :func:`folded_linear`): ``x * rsqrt(mean(x^2)
    + eps)`` (RMSNorm: the mean of squares as one batched dot product, half the time of ``F.rms_norm``'s
    reductions at ``(1, 288)``) or ``F.layer_norm`` without weight and bias."""

    def __init__(self, norm: nn.Module, dtype: torch.dtype, device: torch.device):
        norm = cast("nn.RMSNorm | nn.LayerNorm", norm)
        eps = float(norm.eps) if norm.eps is not None else torch.finfo(dtype).eps
        self.eps, self.shape = eps, tuple(norm.normalized_shape)
        self.rms = isinstance(norm, nn.RMSNorm)
        self.eps_tensor = torch.full((1, 1), eps, dtype=dtype, device=device)
        self.inv_dim = 1 / self.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, self.shape, None, None, self.eps)
        if torch.compiler.is_compiling():  # a reduction the compiler fuses with the scaling (not a BLAS call)
            return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + self.eps_tensor)
        # no Python arithmetic on x's values: a traced step would record it as tensor ops (~10 us a norm)
        if x.shape[0] == 1:  # one row (decoding at batch 1): x @ x^T is its sum of squares, (1, 1), in one product
            return x * torch.addmm(self.eps_tensor, x, x.t(), alpha=self.inv_dim).rsqrt_()
        mean_square = torch.baddbmm(self.eps_tensor.view(1, 1, 1), x.unsqueeze(1), x.unsqueeze(2), alpha=self.inv_dim)
        return x * mean_square.squeeze(2).rsqrt_()


def folded_linear(
    norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', b')`` with ``W' x_hat + b' = W (g * x_hat + beta) + b``: the norm's gain ``g`` (and LayerNorm's shift
    ``beta``) folded into the matrix that reads it. The same function; rounding differs (as with any change of
    summation order)."""
    weight = weight.detach()
    gain, shift = getattr(norm, "weight", None), getattr(norm, "bias", None)
    folded_bias = None if bias is None else bias.detach()
    if shift is not None:
        moved = weight @ shift.detach()
        folded_bias = moved if folded_bias is None else folded_bias + moved
    if gain is not None:
        weight = weight * gain.detach()
    return weight, folded_bias


class FastLayer:
    """One block's weights: fused qkv (q / k rows interleaved for rotary), out-projection, norms folded in,
    gate and up fused."""

    def __init__(self, block: Block, fmt: WeightFormat, dtype: torch.dtype, rotary: bool):
        attn = block.attn
        self.n_heads, self.head_dim = attn.n_heads, attn.head_dim
        self.scale = self.head_dim**-0.5  # SDPA's default scale
        self.inner = attn.n_heads * attn.head_dim
        device = attn.qkv.weight.device
        weight, bias = folded_linear(block.norm_attn, attn.qkv.weight, attn.qkv.bias)
        if rotary:
            order = interleaved_rows(self.n_heads, self.head_dim).to(device)
            rows = torch.cat([order, order + self.inner, torch.arange(2 * self.inner, 3 * self.inner, device=device)])
            weight = weight.index_select(0, rows)
            bias = None if bias is None else bias.index_select(0, rows)
        self.qkv = fmt.kernel(weight, bias, dtype)
        self.proj = fmt.kernel(attn.proj.weight, attn.proj.bias, dtype)
        self.norm_attn, self.norm_ff = Norm(block.norm_attn, dtype, device), Norm(block.norm_ff, dtype, device)
        ff = cast("FeedForward | GatedFeedForward", block.ff)
        self.act = ff.act
        self.gated = isinstance(ff, GatedFeedForward)
        if isinstance(ff, GatedFeedForward):
            self.hidden = ff.gate.out_features
            biases = None if ff.gate.bias is None else torch.cat([ff.gate.bias.detach(), ff.up.bias.detach()])
            up = torch.cat([ff.gate.weight.detach(), ff.up.weight.detach()])
            self.up = fmt.kernel(*folded_linear(block.norm_ff, up, biases), dtype)
        else:
            self.up = fmt.kernel(*folded_linear(block.norm_ff, ff.up.weight, ff.up.bias), dtype)
        self.down: Kernel = fmt.kernel(ff.down.weight, ff.down.bias, dtype)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + down(act(gate(n(x))) * up(n(x)))`` (or ``x + down(act(up(n(x))))``), x of shape (M, d)."""
        h = self.up(self.norm_ff(x))
        # gated: gate and up as two narrows (a traced split is one op of ~4 us, a narrow one view; h[:, :n] two)
        if self.gated:
            h = self.act(h.narrow(1, 0, self.hidden)).mul_(h.narrow(1, self.hidden, self.hidden))
        else:
            h = self.act(h)
        return self.down.add_to(x, h)


class PreparedWeights:
    """Every tensor the fast step reads, in one format (built once per model, format and weight version)."""

    def __init__(self, model: DecoderTransformer, fmt: WeightFormat):
        device = model.head.weight.device
        fmt.check(device)
        self.format = fmt
        self.dtype = model.head.weight.dtype
        self.cache_dtype = fmt.cache_dtype(self.dtype)  # the KV cache's and attention's
        config = model.config
        self.context = config.context_length
        self.embedding = model.embedding.weight.detach()
        positions = torch.arange(self.context, device=device)
        self.rotary: torch.Tensor | None = None  # (context, head_dim / 2, 2): (cos, sin) pairs
        self.additive: torch.Tensor | None = None  # (context, d_model)
        if isinstance(model.positional, RotaryPositional):
            cos, sin = model.positional.rotary(positions)
            self.rotary = torch.stack([cos, sin], dim=-1).to(self.dtype).contiguous()
        else:
            table = model.positional.embed(positions)
            self.additive = None if table is None else table.detach().to(self.dtype)
        rotary = self.rotary is not None
        self.layers = [FastLayer(block, fmt, self.dtype, rotary) for block in model.layers]
        self.final_norm = Norm(model.final_norm, self.dtype, device)
        self.head = fmt.kernel(*folded_linear(model.final_norm, model.head.weight, model.head.bias), self.dtype)
        self.vocab_size = config.vocab_size
        self.key_positions = positions
        kernels = [self.head, *(k for layer in self.layers for k in (layer.qkv, layer.proj, layer.up, layer.down))]
        self.traceable = all(kernel.traceable for kernel in kernels)
        self.traced: dict[tuple[int, int], Callable] = {}  # (batch, keys) -> traced one-token step
        self.compiled: dict[tuple[int, int], OneTokenProgram] = {}  # (batch, threads) -> compiled_step.compiled_step


# the traced one-token step attends over the first multiple of this many cache slots that holds the position
# (the later ones masked): one trace per bucket, ~0.05 s each, instead of one per position
ATTENTION_BUCKET = 64
# from this batch size on, one-token steps run eagerly over exactly the cached positions: the Python between
# the ops is small beside the work, and a bucket's masked slots are not (measured at batch 32, stories15M shape)
EAGER_FROM_BATCH = 8


class CacheWindow:
    """One layer's ``(B, H, context, D)`` key and value caches (a step writes its slot into them) and views of
    their first ``keys`` slots as the ``(B*H, D, keys)`` / ``(B*H, keys, D)`` operands of its two batched products
    (made once per bucket, so a traced step records no view ops for them)."""

    def __init__(self, keys_cache: torch.Tensor, values_cache: torch.Tensor, keys: int):
        batch, heads, context, head_dim = keys_cache.shape
        self.keys, self.values = keys_cache, values_cache  # written whole (a step writes one slot < keys)
        # the (contiguous) caches viewed 3-D first, then cut: no question of the cut's contiguity, which would pin
        # a dynamic window size to the context under compilation
        self.keys_t = keys_cache.view(batch * heads, context, head_dim)[:, :keys].transpose(1, 2)
        self.values_3d = values_cache.view(batch * heads, context, head_dim)[:, :keys]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.keys_t, self.values_3d


def one_token_logits(
    w: PreparedWeights, ids: torch.Tensor, position: torch.Tensor, windows: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Logits ``(B, vocab)`` of one new token per row at ``position`` (a ``(1,)`` tensor), its k / v written into
    slot ``position`` of each layer's cache, attention over the window's slots with the ones past ``position``
    masked (``windows``: each layer's :meth:`CacheWindow.tensors`, flat): the same computation as
    :meth:`FastDecoder.__call__` of one token, with no Python-side position, so :func:`torch.jit.trace` records it
    once per ``(batch, keys)``."""
    x = F.embedding(ids.reshape(-1), w.embedding)
    if w.additive is not None:
        x = x + w.additive.index_select(0, position)
    # (1, D/2, 2) (cos, sin) pairs over q and k, as rotate_in_place reads them (made once for every layer)
    rotary = None if w.rotary is None else rotation(w.rotary.index_select(0, position))
    keys, cache_dtype = windows[2].shape[2], windows[2].dtype
    bias = torch.zeros(1, 1, keys, dtype=cache_dtype, device=x.device).masked_fill_(
        (w.key_positions.narrow(0, 0, keys) > position).view(1, 1, keys), float("-inf")
    )
    # every view from constant sizes and one call: in a trace, x[:, i] is a slice and a select, a view ~1 us each
    for i, layer in enumerate(w.layers):
        keys_window, values_window, keys_t, values_3d = windows[4 * i : 4 * i + 4]
        # (B, 3, H, 1, D): q, k and v of each head, a k or v already shaped as its cache slot
        qkv = layer.qkv(layer.norm_attn(x)).view(-1, 3, layer.n_heads, 1, layer.head_dim)
        if rotary is not None:
            rotate_in_place(qkv.view(-1, 3, layer.n_heads, layer.head_dim // 2, 2), rotary)
        if cache_dtype != qkv.dtype:
            qkv = qkv.to(cache_dtype)
        keys_window.index_copy_(2, position, qkv.select(1, 1))
        values_window.index_copy_(2, position, qkv.select(1, 2))
        query = qkv.select(1, 0).reshape(-1, 1, layer.head_dim)  # (B*H, 1, D)
        if torch.compiler.is_compiling():  # a bmm the compiler turns into a loop fused with the softmax
            scores = torch.bmm(query, keys_t) * layer.scale + bias
        else:
            scores = torch.baddbmm(bias, query, keys_t, alpha=layer.scale)
        probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32)  # fp32 sums
        if cache_dtype != torch.float32:
            probabilities = probabilities.to(cache_dtype)
        y = torch.bmm(probabilities, values_3d)
        x = layer.proj.add_to(x, y.view(-1, layer.inner))
        x = layer.feed_forward(x)
    return w.head(w.final_norm(x))


def traced_step(w: PreparedWeights, ids: torch.Tensor, position: torch.Tensor, windows: list[torch.Tensor]):
    """:func:`one_token_logits` as a TorchScript trace (built on first use, kept in ``w.traced``): the same aten
    calls without the Python interpreter between them (measured ~0.5 ms a token less at the stories15M shape)."""
    key = (ids.shape[0], windows[2].shape[2])  # (batch, keys)
    step = w.traced.get(key)
    if step is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
            step = torch.jit.trace(
                lambda ids, position, *windows: one_token_logits(w, ids, position, windows),
                (ids, position, *windows),
                check_trace=False,
            )
        w.traced[key] = step
    return step(ids, position, *windows)


def new_caches(w: PreparedWeights, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's ``(B, H, context, D)`` key and value caches, zeros, in the format's cache dtype."""

    def cache(layer: FastLayer) -> torch.Tensor:
        shape = (batch, layer.n_heads, w.context, layer.head_dim)
        return torch.zeros(shape, device=w.embedding.device, dtype=w.cache_dtype)

    return [cache(layer) for layer in w.layers], [cache(layer) for layer in w.layers]


class OneTokenProgram(Protocol):
    """A compiled :func:`one_token_logits` (:class:`~tiny_decoder.model.compiled_step.CompiledStep`):
    ``program(ids (B, 1), position (1,), keys, values) -> logits``, the caches written in place."""

    def __call__(
        self, ids: torch.Tensor, position: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
    ) -> torch.Tensor: ...

    def check_caches(self, caches: Sequence[torch.Tensor]) -> None: ...


class FastDecoder:
    """A KV cache plus :class:`PreparedWeights`: ``decoder(ids (B, T))`` appends T tokens and returns the last
    position's logits ``(B, vocab)``. :meth:`reset` empties the cache (the cropped window past the context).

    Each layer caches keys and values as ``(B, H, context, D)`` tensors (zeros at first: the traced step reads
    masked slots, which must not hold NaNs), so the keys of one head are contiguous (attention reads them in
    one pass; a cache interleaving batch rows between positions was ~4x slower to attend over at batch 32).
    A step writes its k / v into their slots (one copy each) after rotating q and k in place.
    """

    def __init__(
        self, weights: PreparedWeights, batch_size: int, traced: bool = True, program: OneTokenProgram | None = None
    ):
        self.weights = weights
        # one-token steps through :func:`traced_step`
        self.traced = traced and weights.traceable and batch_size < EAGER_FROM_BATCH
        device = weights.embedding.device
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.compiled = program  # one-token steps through a compiled program (compiled_step.compiled_step)
        self.step_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # its contiguous input
        self.keys, self.values = new_caches(weights, batch_size)
        if program is not None:
            program.check_caches([*self.keys, *self.values])
        self.windows: dict[int, list[torch.Tensor]] = {}  # bucket -> every layer's CacheWindow tensors, flat
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def window_tensors(self, keys: int) -> list[torch.Tensor]:
        if keys not in self.windows:
            self.windows[keys] = [
                t for k, v in zip(self.keys, self.values, strict=True) for t in CacheWindow(k, v, keys).tensors()
            ]
        return self.windows[keys]

    def one_token(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, vocab)`` after appending ``ids (B, 1)``, through the compiled program (``ids`` at strides
        ``(1, 1)``, as it reads them) or the traced step."""
        start = self.length
        if self.compiled is not None:
            logits = self.compiled(ids, self.position.fill_(start), self.keys, self.values)
        else:
            keys = min(self.weights.context, -(-(start + 1) // ATTENTION_BUCKET) * ATTENTION_BUCKET)
            logits = traced_step(self.weights, ids, self.position.fill_(start), self.window_tensors(keys))
        self.length = start + 1
        return logits

    def greedy(self, logits: torch.Tensor, count: int, eos_id: int | None = None) -> torch.Tensor:
        """``count`` greedy tokens ``(B, k)`` after ``logits`` (the last position's, ``(B, vocab)``), each fed
        back in, in one loop of one-token steps (:meth:`one_token`): each argmax is written where the next step
        reads its ids, so a token costs the step, one argmax and a fill, not ``generate``'s per-token loop
        (~0.05 ms a token less at 2 threads, stories15M shape). ``k < count`` once every row has emitted
        ``eos_id`` (such a row keeps emitting it, as in ``generate``). The cache must have room for the
        ``count - 1`` tokens fed back; needs a one-token program or trace (:attr:`fast_loop`)."""
        if not self.fast_loop:
            raise ValueError("greedy() needs the compiled program or the traced one-token step (batch < 8)")
        if self.length + count - 1 > self.weights.context:
            raise ValueError(f"the fast decoder holds {self.weights.context} positions; {count} greedy tokens "
                             f"after {self.length} would reach {self.length + count - 1}")  # fmt: skip
        batch = logits.shape[0]
        picked = torch.empty(count, batch, 1, dtype=torch.long, device=logits.device)  # picked[i]: strides (1, 1)
        finished = torch.zeros(batch, 1, dtype=torch.bool, device=logits.device)  # rows that emitted eos_id
        for i in range(count):
            if i:
                logits = self.one_token(picked[i - 1])
            torch.argmax(logits, dim=-1, keepdim=True, out=picked[i])
            if eos_id is not None:
                picked[i].masked_fill_(finished, eos_id)
                finished |= picked[i] == eos_id
                if bool(finished.all()):
                    return picked[: i + 1, :, 0].t()
        return picked[:, :, 0].t()

    @property
    def fast_loop(self) -> bool:
        """Whether one-token steps run as one call (the compiled program, or the traced step)."""
        return self.compiled is not None or self.traced

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weights
        batch, new = ids.shape
        start, end = self.length, self.length + new
        if end > w.context:
            raise ValueError(f"the fast decoder holds {w.context} positions; appending would reach {end}")
        if new == 1 and self.compiled is not None:
            # a slice of the caller's tokens has their strides; the program reads (B, 1) ids at strides (1, 1)
            return self.one_token(self.step_ids.copy_(ids))
        if new == 1 and self.traced:
            return self.one_token(ids)
        x = F.embedding(ids.reshape(-1), w.embedding)
        if w.additive is not None:
            x = (x.view(batch, new, -1) + w.additive[start:end]).view(batch * new, -1)
        rotary = None if w.rotary is None else rotation(w.rotary[start:end].view(new, 1, 1, -1, 2))
        mask = None
        if new > 1 and start > 0:  # queries start..end-1 see keys 0..their own position
            mask = torch.ones(new, end, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        for i, layer in enumerate(w.layers):
            qkv = layer.qkv(layer.norm_attn(x)).view(batch, new, 3, layer.n_heads, layer.head_dim)
            if rotary is not None:
                rotate_in_place(qkv.view(batch, new, 3, layer.n_heads, layer.head_dim // 2, 2), rotary)
            self.keys[i][:, :, start:end] = qkv[:, :, 1].transpose(1, 2)
            self.values[i][:, :, start:end] = qkv[:, :, 2].transpose(1, 2)
            y = F.scaled_dot_product_attention(
                # a strided query: ~20% slower at batch 32
                qkv[:, :, 0].transpose(1, 2).to(w.cache_dtype, memory_format=torch.contiguous_format),
                self.keys[i][:, :, :end],
                self.values[i][:, :, :end],
                attn_mask=mask,
                is_causal=new > 1 and start == 0,
            )
            x = layer.proj.add_to(x, y.transpose(1, 2).reshape(batch * new, layer.inner))
            x = layer.feed_forward(x)
        self.length = end
        last = x if new == 1 else x.view(batch, new, -1)[:, -1]
        return w.head(w.final_norm(last))


def rotation(rotary: torch.Tensor) -> torch.Tensor:
    """``(cos, sin)`` pairs ``(..., D/2, 2)`` as :func:`rotate_in_place` reads them: eagerly one complex number
    each (a view); under compilation the real pairs (its compiler has no complex arithmetic on a CPU)."""
    return rotary if torch.compiler.is_compiling() else torch.view_as_complex(rotary)


def rotate_in_place(pairs: torch.Tensor, rotary: torch.Tensor) -> None:
    """Rotate q and k of ``pairs``, a ``(..., 3, H, D/2, 2)`` view of ``qkv`` (interleaved pairs), by ``rotary``
    (the :func:`rotation` of ``(cos, sin)`` pairs ``(..., D/2, 2)``, broadcast from the right: ``(T, 1, 1, D/2,
    2)`` for ``(B, T, 3, H, D/2, 2)``), in place: eagerly one complex multiply on both; under compilation
    (:mod:`~tiny_decoder.model.compiled_step`) the same products written out in real numbers."""
    pairs = pairs.narrow(-4, 0, 2)  # q and k
    if not torch.compiler.is_compiling():
        torch.view_as_complex(pairs).mul_(rotary)
        return
    x, y = pairs[..., 0], pairs[..., 1]
    cos, sin = rotary[..., 0], rotary[..., 1]
    pairs.copy_(torch.stack([x * cos - y * sin, x * sin + y * cos], dim=-1))


def weight_versions(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version counter of every parameter and buffer: changes when the weights do."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), t._version) for t in tensors)


class PreparedWeightsCache:
    """:class:`PreparedWeights` per model and format, rebuilt when the model's weights changed."""

    def __init__(self):
        # model -> {(format, its kernel type): (versions, w)}
        self.entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model: DecoderTransformer, weights: str, portable: bool = False) -> PreparedWeights:
        """``portable``: kernels of plain tensors only (what :mod:`~tiny_decoder.model.compiled_step` compiles).
        Kept per kernel type, so a format whose kernels are plain tensors anyway (all but CPU bf16's oneDNN) is
        prepared once for the eager and the compiled step."""
        versions = weight_versions(model)
        fmt = weight_format(weights, portable)
        slot = (weights, fmt.kernel_type(model.head.weight.device))
        per_model = self.entries.setdefault(model, {})
        hit = per_model.get(slot)
        if hit is None or hit[0] != versions:
            hit = (versions, PreparedWeights(model, fmt))
            per_model[slot] = hit
        return hit[1]


PREPARED_WEIGHTS = PreparedWeightsCache()
