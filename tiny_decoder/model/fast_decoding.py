"""The fast decoding step: the model's weights laid out for incremental decoding, run with a few large ops.

At the sizes this project trains (stories15M: d 288, 6 layers) a one-token step is bound by per-op overhead
and by reading the weights, not by arithmetic. The module path (``model(ids, cache)``) spends most of a step in
Python and in small ops (nn.Module calls, rotary's chunk / cat, separate gate / up projections, cache appends,
residual adds). :class:`FastDecoder` computes the same function from flat tensors, eagerly, no compilation:

* per layer ``norm -> qkv (one mm) -> rotary (one complex multiply, in place, on q and k together) -> one cache
  write of k and v -> SDPA -> out-projection with the residual added in (addmm) -> norm -> gate and up in one
  mm -> act * up -> down-projection + residual (addmm)``; logits only for the last position;
* q / k rows permuted per head from the rotate-half layout to interleaved pairs, so rotary is a complex
  multiply; the cached keys are in that order too (a dot product does not depend on the order of its terms,
  so the attention scores are unchanged);
* one-token steps run as a TorchScript trace of the same calls (:func:`traced_step`: no Python between the aten
  calls; traced in ~0.05 s on first use, one trace per batch size and attention bucket of 64 cache slots, the
  slots past the position masked); prompts and formats whose weights cannot be trace constants (oneDNN's packed
  bf16) run eagerly;
* the matrices in a :mod:`~tiny_decoder.model.decoding_weights` format (``weights=model`` by default: same
  numerics as the module path up to summation order; ``bf16`` / ``int8`` opt-in).

It covers the models most recipes build (:func:`fast_decoding_problem` names what it does not: then
``generate`` uses the module path). Prepared weights are cached per model and format, and rebuilt when the
model's weights change (training).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import cast

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
        self.eps_tensor = torch.full((1, 1, 1), eps, dtype=dtype, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, self.shape, None, None, self.eps)
        rows, dim = x.shape
        mean_square = torch.baddbmm(self.eps_tensor, x.view(rows, 1, dim), x.view(rows, dim, 1), alpha=1 / dim)
        return x * mean_square.view(rows, 1).rsqrt_()


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
        if self.gated:
            gate, up = h.split(self.hidden, dim=1)
            h = self.act(gate).mul_(up)
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
        config = model.config
        self.context = config.context_length
        self.embedding = model.embedding.weight.detach()
        positions = torch.arange(self.context, device=device)
        self.rotary: torch.Tensor | None = None  # (context, head_dim / 2) complex: cos + i sin
        self.additive: torch.Tensor | None = None  # (context, d_model)
        if isinstance(model.positional, RotaryPositional):
            cos, sin = model.positional.rotary(positions)
            self.rotary = torch.complex(cos, sin).to(
                torch.complex128 if self.dtype == torch.float64 else torch.complex64
            )
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


# the traced one-token step attends over the first multiple of this many cache slots that holds the position
# (the later ones masked): one trace per bucket, ~0.05 s each, instead of one per position
ATTENTION_BUCKET = 64


def one_token_logits(
    w: PreparedWeights, ids: torch.Tensor, position: torch.Tensor, caches: Sequence[torch.Tensor], keys: int
) -> torch.Tensor:
    """Logits ``(B, vocab)`` of one new token per row at ``position`` (a ``(1,)`` tensor), its q / k / v written into
    slot ``position`` of each layer's ``(context, B, 3, H, D)`` cache, attention over the first ``keys`` slots with
    the ones past ``position`` masked: the same computation as :meth:`FastDecoder.__call__` of one token, with no
    Python-side position, so :func:`torch.jit.trace` records it once per ``(batch, keys)``."""
    batch = ids.shape[0]
    x = F.embedding(ids.reshape(-1), w.embedding)
    if w.additive is not None:
        x = x + w.additive.index_select(0, position)
    rotary = None if w.rotary is None else w.rotary.index_select(0, position).view(1, 1, 1, 1, -1)
    visible = (w.key_positions[:keys] <= position).view(1, keys)
    for layer, cache in zip(w.layers, caches, strict=True):
        qkv = layer.qkv(layer.norm_attn(x)).view(batch, 1, 3, layer.n_heads, layer.head_dim)
        if rotary is not None:
            rotate_in_place(qkv, rotary)
        cache.index_copy_(0, position, qkv.transpose(0, 1))
        window = cache[:keys]
        y = F.scaled_dot_product_attention(
            qkv[:, :, 0].transpose(1, 2),
            window[:, :, 1].permute(1, 2, 0, 3),
            window[:, :, 2].permute(1, 2, 0, 3),
            attn_mask=visible,
        )
        x = layer.proj.add_to(x, y.reshape(batch, layer.inner))
        x = layer.feed_forward(x)
    return w.head(w.final_norm(x))


def traced_step(w: PreparedWeights, ids: torch.Tensor, position: torch.Tensor, caches: list[torch.Tensor], keys: int):
    """:func:`one_token_logits` as a TorchScript trace (built on first use, kept in ``w.traced``): the same aten
    calls without the Python interpreter between them (measured ~0.5 ms a token less at the stories15M shape)."""
    key = (ids.shape[0], keys)
    step = w.traced.get(key)
    if step is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
            step = torch.jit.trace(
                lambda ids, position, *caches: one_token_logits(w, ids, position, caches, keys),
                (ids, position, *caches),
                check_trace=False,
            )
        w.traced[key] = step
    return step(ids, position, *caches)


class FastDecoder:
    """A KV cache plus :class:`PreparedWeights`: ``decoder(ids (B, T))`` appends T tokens and returns the last
    position's logits ``(B, vocab)``. :meth:`reset` empties the cache (the cropped window past the context).

    The cache of a layer is ``(context, B, 3, H, D)``: a position's q, k and v side by side, written into its slot
    with one copy (a prompt's) or one ``index_copy_`` (a traced one-token step) and rotated there in place;
    attention reads keys and values through strided views of it.
    """

    def __init__(self, weights: PreparedWeights, batch_size: int, traced: bool = True):
        self.weights = weights
        self.traced = traced and weights.traceable  # one-token steps through :func:`traced_step`
        device = weights.embedding.device
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.caches = [  # zeros: the traced step reads masked slots, which must not hold NaNs
            torch.zeros(
                weights.context, batch_size, 3, layer.n_heads, layer.head_dim, device=device, dtype=weights.dtype
            )
            for layer in weights.layers
        ]
        # (B, H, context, D) views of the keys and values
        self.keys = [cache[:, :, 1].permute(1, 2, 0, 3) for cache in self.caches]
        self.values = [cache[:, :, 2].permute(1, 2, 0, 3) for cache in self.caches]
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weights
        batch, new = ids.shape
        start, end = self.length, self.length + new
        if end > w.context:
            raise ValueError(f"the fast decoder holds {w.context} positions; appending would reach {end}")
        if new == 1 and self.traced:
            keys = min(w.context, -(-end // ATTENTION_BUCKET) * ATTENTION_BUCKET)
            logits = traced_step(w, ids, self.position.fill_(start), self.caches, keys)
            self.length = end
            return logits
        x = F.embedding(ids.reshape(-1), w.embedding)
        if w.additive is not None:
            x = (x.view(batch, new, -1) + w.additive[start:end]).view(batch * new, -1)
        rotary = None if w.rotary is None else w.rotary[start:end].view(1, new, 1, 1, -1)
        mask = None
        if new > 1 and start > 0:  # queries start..end-1 see keys 0..their own position
            mask = torch.ones(new, end, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        for i, layer in enumerate(w.layers):
            qkv = self._qkv(layer, self.caches[i], x, start, end)
            if rotary is not None:
                rotate_in_place(qkv, rotary)
            y = F.scaled_dot_product_attention(
                qkv[:, :, 0].transpose(1, 2),
                self.keys[i].narrow(2, 0, end),
                self.values[i].narrow(2, 0, end),
                attn_mask=mask,
                is_causal=new > 1 and start == 0,
            )
            x = layer.proj.add_to(x, y.transpose(1, 2).reshape(batch * new, layer.inner))
            x = layer.feed_forward(x)
        self.length = end
        last = x if new == 1 else x.view(batch, new, -1)[:, -1]
        return w.head(w.final_norm(last))

    @staticmethod
    def _qkv(layer: FastLayer, cache: torch.Tensor, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """This step's q, k, v written into the cache slots ``start:end``; returned as a ``(B, T, 3, H, D)`` view."""
        slots = cache[start:end]
        new, batch = slots.shape[:2]
        h = layer.norm_attn(x)
        if new == 1:
            layer.qkv.into(h, slots.view(batch, -1))
        else:
            slots.copy_(layer.qkv(h).view(batch, new, 3, layer.n_heads, layer.head_dim).transpose(0, 1))
        return slots.transpose(0, 1)


def rotate_in_place(qkv: torch.Tensor, rotary: torch.Tensor) -> None:
    """Rotate q and k of ``qkv (B, T, 3, H, D)`` (interleaved pairs) by ``rotary`` (complex ``cos + i sin``, ``(1,
    T, 1, 1, D/2)``): one complex multiply on both, in place."""
    torch.view_as_complex(qkv.unflatten(-1, (-1, 2)))[:, :, :2].mul_(rotary)


def weight_versions(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version counter of every parameter and buffer: changes when the weights do."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), t._version) for t in tensors)


class PreparedWeightsCache:
    """:class:`PreparedWeights` per model and format, rebuilt when the model's weights changed."""

    def __init__(self):
        self.entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {format: (versions, w)}

    def get(self, model: DecoderTransformer, weights: str) -> PreparedWeights:
        versions = weight_versions(model)
        per_model = self.entries.setdefault(model, {})
        hit = per_model.get(weights)
        if hit is None or hit[0] != versions:
            hit = (versions, PreparedWeights(model, weight_format(weights)))
            per_model[weights] = hit
        return hit[1]


PREPARED_WEIGHTS = PreparedWeightsCache()
