"""Attention invariants: causality, cached decoding and shapes for every allowed attention x positional pair;
refused pairs; standard == sdpa; banded longformer == its masked reference; causal linformer's design."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.model.conftest import tiny_config
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import DecoderTransformer, efficient_attention
from tiny_decoder.model import attention as attention_module
from tiny_decoder.model.attention import ATTENTION, chunked_dropout_attention, dropout_attention
from tiny_decoder.model.efficient_attention import (
    LinformerAttention,
    banded_window_attention,
    masked_window_attention,
)
from tiny_decoder.model.positional import AttentionInputs, alibi_slopes
from tiny_decoder.model.validation import validate_model_config

VOCAB, LENGTH, BATCH = 11, 12, 2
ATTENTIONS = {
    "standard": {"name": "standard"},
    "sdpa": {"name": "sdpa"},
    "linformer": {"name": "linformer", "k": 3, "block_size": 4},
    "longformer": {"name": "longformer", "window": 3, "n_global": 2},
    "longformer-masked": {"name": "longformer", "window": 3, "n_global": 2, "implementation": "masked"},
}
POSITIONALS = ["learned", "sinusoidal", "numeric", "rope", "alibi", "none"]


def _refused(attention: str, positional: str) -> bool:
    return positional in ATTENTION.get(ATTENTIONS[attention]["name"]).incompatible_positional


ALLOWED = [(a, p, "token") for a in ATTENTIONS for p in POSITIONALS if not _refused(a, p)] + [
    ("standard", "numeric", "numeric"),
    ("sdpa", "alibi", "numeric"),
    ("linformer", "rope", "numeric"),
    ("longformer", "numeric", "numeric"),
]
REFUSED = [(a, p) for a in ("standard", "sdpa", "linformer", "longformer") for p in POSITIONALS if _refused(a, p)]
PIECES = (3, 4, 1, 1, 1, 1, 1)  # prefill 3, a 4-token chunk crossing a block boundary, then single tokens


def _model(build, attention: str, positional: str, embedding: str = "token") -> DecoderTransformer:
    return build(attention=ATTENTIONS[attention], positional={"name": positional}, embedding={"name": embedding})


def _ids(length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, length))


def _decode(model: DecoderTransformer, ids: torch.Tensor, pieces=PIECES, static: bool = False) -> list[torch.Tensor]:
    cache, start, outputs = model.new_cache(ids.shape[0], static=static), 0, []
    for size in pieces:
        outputs.append(model(ids[:, start : start + size], cache))
        start += size
    assert cache.length == start == ids.shape[1]
    return outputs


@pytest.mark.parametrize(("attention", "positional", "embedding"), ALLOWED)
def test_causal(build, attention, positional, embedding):
    model = _model(build, attention, positional, embedding)
    ids = _ids()
    logits = model(ids)
    for t in (0, 4, 9):
        changed = ids.clone()
        changed[:, t + 1 :] = (ids[:, t + 1 :] + torch.randint(1, VOCAB, ids[:, t + 1 :].shape)) % VOCAB
        out = model(changed)
        assert_close(out[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize(("attention", "positional", "embedding"), ALLOWED)
def test_cached_decoding_equals_full(build, attention, positional, embedding):
    model = _model(build, attention, positional, embedding)
    ids = _ids()
    pieces = _decode(model, ids)
    assert [tuple(p.shape) for p in pieces] == [(BATCH, n, VOCAB) for n in PIECES]
    assert_close(torch.cat(pieces, dim=1), model(ids), rtol=0, atol=1e-9)


STATIC = [case for case in ALLOWED if case[0] in ("standard", "sdpa")]


@pytest.mark.parametrize(("attention", "positional", "embedding"), STATIC)
def test_static_cache_decoding_equals_full(build, attention, positional, embedding):
    """The fixed-shape cache of compiled decoding: every step attends over all 12 slots, unwritten ones masked."""
    model = _model(build, attention, positional, embedding)
    ids = _ids()
    pieces = _decode(model, ids, static=True)
    assert [tuple(p.shape) for p in pieces] == [(BATCH, n, VOCAB) for n in PIECES]
    assert_close(torch.cat(pieces, dim=1), model(ids), rtol=0, atol=1e-9)


def test_static_cache_single_token_step_masks_unwritten_slots(build):
    """Garbage in the unwritten slots must not leak into a one-token step (SDPA's no-mask shortcut is off)."""
    model = _model(build, "sdpa", "rope")
    ids = _ids()
    cache = model.new_cache(BATCH, static=True)
    for keys, values in zip(cache.keys, cache.values, strict=True):
        keys.normal_(), values.normal_()
    model(ids[:, :5], cache)
    assert_close(model(ids[:, 5:6], cache), model(ids[:, :6])[:, 5:], rtol=0, atol=1e-9)
    assert cache.length == 6


@pytest.mark.parametrize("attention", ["linformer", "longformer"])
def test_static_cache_is_refused_where_attention_needs_the_key_count(build, attention):
    model = _model(build, attention, "rope")
    assert not model.supports_static_cache
    with pytest.raises(ValueError, match="static KV cache; use attention=sdpa or standard"):
        model.new_cache(BATCH, static=True)


@pytest.mark.parametrize(("attention", "positional", "embedding"), ALLOWED)
def test_shapes(build, attention, positional, embedding):
    model = _model(build, attention, positional, embedding)
    assert model(_ids()).shape == (BATCH, LENGTH, VOCAB)
    assert model(_ids(5)).shape == (BATCH, 5, VOCAB)
    assert model.hidden_states(_ids(7)).shape == (BATCH, 7, 8)
    with pytest.raises(ValueError, match="context_length=12"):
        model(_ids(LENGTH + 1))


@pytest.mark.parametrize(("attention", "positional"), REFUSED)
def test_refused_pair_names_both_and_why(make_config, attention, positional):
    reason = ATTENTION.get(attention).incompatible_positional[positional]
    config = make_config(attention=ATTENTIONS[attention], positional={"name": positional})
    for make in (lambda: validate_model_config(config), lambda: DecoderTransformer(config)):
        with pytest.raises(ConfigError) as error:
            make()
        message = str(error.value)
        assert f"attention={attention}" in message and f"positional={positional}" in message
        assert reason in message


def test_refused_pairs_are_exactly_linformer_alibi():
    assert REFUSED == [("linformer", "alibi")]
    assert "distance" in LinformerAttention.incompatible_positional["alibi"]


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
def test_standard_equals_sdpa(build, positional):
    standard = _model(build, "standard", positional)
    sdpa = _model(build, "sdpa", positional)
    torch.manual_seed(99)  # different init, then copy: equality comes from the weights, not the seed
    sdpa.load_state_dict(standard.state_dict())
    ids = _ids()
    assert_close(sdpa(ids), standard(ids), rtol=0, atol=1e-12)
    for ours, theirs in zip(_decode(sdpa, ids), _decode(standard, ids), strict=True):
        assert_close(ours, theirs, rtol=0, atol=1e-12)


# --- longformer --------------------------------------------------------------------------------------------


def _inputs(n_new: int, n_keys: int, heads: int, alibi: bool) -> AttentionInputs:
    q_pos, k_pos = torch.arange(n_keys - n_new, n_keys), torch.arange(n_keys)
    bias = None
    if alibi:
        distance = (q_pos.unsqueeze(1) - k_pos.unsqueeze(0)).clamp(min=0).double()
        bias = -alibi_slopes(heads).double().view(-1, 1, 1) * distance
    return AttentionInputs(q_pos, k_pos, None, bias)


@pytest.mark.parametrize("n_keys", [3, 10, 12])  # shorter than the window, not a multiple of it, a multiple
@pytest.mark.parametrize("n_global", [0, 2, 5])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("n_new", ["all", 1, 3])  # full sequence, one cached token, a cached chunk
def test_banded_equals_masked(n_keys, n_global, alibi, n_new):
    n_new = n_keys if n_new == "all" else n_new
    heads, dim, window = 3, 4, 4
    q = torch.randn(2, heads, n_new, dim, dtype=torch.float64)
    k, v = torch.randn(2, 2, heads, n_keys, dim, dtype=torch.float64)
    inputs = _inputs(n_new, n_keys, heads, alibi)
    expected = masked_window_attention(q, k, v, inputs, window, n_global, 0.0)
    assert_close(banded_window_attention(q, k, v, inputs, window, n_global, 0.0), expected, rtol=0, atol=1e-12)


def test_masked_reference_visibility():
    """Query i sees j iff i - w < j <= i, or j < n_global and j <= i (global tokens also attend causally)."""
    n, window, n_global = 8, 3, 2
    inputs = _inputs(n, n, 1, alibi=False)
    k = torch.zeros(1, 1, n, 1, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64).view(1, 1, n, n)  # output row = attention weights
    weights = masked_window_attention(torch.zeros(1, 1, n, 1, dtype=torch.float64), k, v, inputs, window, n_global, 0)
    visible = torch.tensor([[(i - window < j <= i) or (j < n_global and j <= i) for j in range(n)] for i in range(n)])
    assert torch.equal(weights[0, 0] > 0, visible)
    assert_close(weights[0, 0, 0], torch.eye(n, dtype=torch.float64)[0])  # global token 0 sees only itself


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
def test_banded_model_equals_masked_model(build, positional):
    banded = _model(build, "longformer", positional)
    masked = _model(build, "longformer-masked", positional)
    masked.load_state_dict(banded.state_dict())
    ids = _ids()
    assert_close(banded(ids), masked(ids), rtol=0, atol=1e-12)
    for ours, theirs in zip(_decode(banded, ids), _decode(masked, ids), strict=True):
        assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("positional", ["learned", "alibi"])
@pytest.mark.parametrize(("window", "n_global"), [(LENGTH, 0), (LENGTH + 5, 3)])
def test_longformer_with_window_over_length_is_full_attention(build, positional, window, n_global):
    standard = _model(build, "standard", positional)
    longformer = build(
        attention={"name": "longformer", "window": window, "n_global": n_global}, positional={"name": positional}
    )
    longformer.load_state_dict(standard.state_dict())
    ids = _ids()
    assert_close(longformer(ids), standard(ids), rtol=0, atol=1e-12)


def test_small_window_differs_from_full_attention(build):
    standard = _model(build, "standard", "learned")
    longformer = _model(build, "longformer", "learned")
    longformer.load_state_dict(standard.state_dict())
    ids = _ids()
    window = ATTENTIONS["longformer"]["window"]
    assert_close(longformer(ids)[:, :window], standard(ids)[:, :window], rtol=0, atol=1e-12)
    assert not torch.allclose(longformer(ids)[:, window:], standard(ids)[:, window:])


class _CreatedShapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("alibi", [False, True])
def test_banded_never_builds_a_length_by_length_tensor(alibi):
    batch, heads, n, dim, window, n_global = 1, 2, 64, 4, 4, 2
    q, k, v = torch.randn(3, batch, heads, n, dim, dtype=torch.float64)
    inputs = _inputs(n, n, heads, alibi)  # ALiBi's (H, T, T) bias is the positional module's; only its band is read
    with _CreatedShapes() as created:
        out = banded_window_attention(q, k, v, inputs, window, n_global, 0.0)
    assert out.shape == (batch, heads, n, dim)
    assert created.shapes and not any(shape[-2:] == (n, n) for shape in created.shapes)
    largest = max(math.prod(shape) for shape in created.shapes)
    assert largest <= batch * heads * n * dim * window < batch * heads * n * n


def test_banded_model_never_calls_the_masked_path(build, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the banded longformer used the masked path")

    monkeypatch.setitem(efficient_attention.LONGFORMER_IMPLEMENTATIONS, "masked", fail)
    monkeypatch.setattr(efficient_attention, "masked_scores", fail)
    model = _model(build, "longformer", "alibi")
    ids = _ids()
    assert_close(torch.cat(_decode(model, ids), dim=1), model(ids), rtol=0, atol=1e-9)
    with pytest.raises(AssertionError, match="masked path"):
        _model(build, "longformer-masked", "alibi")(ids)


# --- linformer ---------------------------------------------------------------------------------------------


def _naive_linformer(attn: LinformerAttention, q, k, v) -> torch.Tensor:
    """Query at position i in block b: k summaries ``E[:, :b*c] @ K[:b*c]`` (if b > 0) + exact keys b*c..i."""
    c, n_new, n_keys = attn.block_size, q.shape[2], k.shape[2]
    outputs = []
    for row, i in enumerate(range(n_keys - n_new, n_keys)):
        b = i // c
        keys, values = [k[:, :, b * c : i + 1]], [v[:, :, b * c : i + 1]]
        if b > 0:
            keys.insert(0, torch.einsum("kn,bhnd->bhkd", attn.key_proj[:, : b * c], k[:, :, : b * c]))
            values.insert(0, torch.einsum("kn,bhnd->bhkd", attn.value_proj[:, : b * c], v[:, :, : b * c]))
        keys, values = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        scores = q[:, :, row : row + 1] @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])
        outputs.append(torch.softmax(scores, dim=-1) @ values)
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("n_keys", [3, 8, 11, 16])
@pytest.mark.parametrize("n_new", ["all", 1, 5])
def test_linformer_matches_its_definition(make_config, n_keys, n_new):
    n_new = min(n_keys, 5) if n_new == 5 else (n_keys if n_new == "all" else n_new)
    attn = LinformerAttention(make_config(context_length=16), k=3, block_size=4).double()
    q, k, v = torch.randn(3, 2, 2, n_keys, 4, dtype=torch.float64)
    q = q[:, :, n_keys - n_new :]
    inputs = _inputs(n_new, n_keys, 2, alibi=False)
    assert_close(attn.attend(q, k, v, inputs), _naive_linformer(attn, q, k, v), rtol=0, atol=1e-12)


def test_linformer_uses_the_compressed_past(build):
    model = build(n_layers=1, attention=ATTENTIONS["linformer"], positional={"name": "learned"})
    ids = _ids()
    changed = ids.clone()
    changed[:, 0] = (ids[:, 0] + 1) % VOCAB  # token 0 reaches block 1 (positions 4..7) only through summaries
    assert not torch.allclose(model(changed)[:, 4:8], model(ids)[:, 4:8])


def test_linformer_default_block_size_is_k(make_config):
    assert LinformerAttention(make_config(), k=5).block_size == 5
    assert LinformerAttention(make_config(), k=5, block_size=2).block_size == 2


def test_linformer_with_one_block_is_standard_attention(build):
    standard = _model(build, "standard", "rope")
    linformer = build(attention={"name": "linformer", "k": 3, "block_size": LENGTH}, positional={"name": "rope"})
    missing, unexpected = linformer.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and all(name.endswith(("key_proj", "value_proj")) for name in missing)
    ids = _ids()
    assert_close(linformer(ids), standard(ids), rtol=0, atol=1e-12)


def test_parameter_counts(build):
    """longformer adds nothing; linformer adds E and F, 2 * k * context_length per layer, nothing else."""
    standard = _model(build, "standard", "learned").num_parameters()
    assert standard == 1488  # token 88 + positions 96 + 2 blocks * 600 + final norm 16 + head 88
    assert _model(build, "longformer", "learned").num_parameters() == standard
    assert _model(build, "linformer", "learned").num_parameters() == standard + 2 * (2 * 3 * LENGTH)


@pytest.mark.parametrize(
    ("attention", "message"),
    [
        ({"name": "longformer", "window": 0}, "model.attention.window must be an integer >= 1, got 0"),
        ({"name": "longformer", "n_global": -1}, "model.attention.n_global must be an integer >= 0, got -1"),
        ({"name": "longformer", "implementation": "dense"}, "implementation='dense' is unknown"),
        ({"name": "linformer", "k": 0}, "model.attention.k must be an integer >= 1, got 0"),
        ({"name": "linformer", "block_size": 2.5}, "model.attention.block_size must be an integer >= 1, got 2.5"),
    ],
)
def test_efficient_attention_option_errors(make_config, attention, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as error:
        validate_model_config(make_config(attention=attention))
    if "implementation" in attention:
        assert "banded, masked" in str(error.value)
    options = {key: value for key, value in attention.items() if key != "name"}
    with pytest.raises(ConfigError):  # the constructor checks too
        ATTENTION.build(attention["name"], make_config(), 0, **options)


def test_unknown_efficient_attention_option_lists_the_valid_ones(make_config):
    with pytest.raises(ConfigError) as error:
        validate_model_config(make_config(attention={"name": "linformer", "window": 4}))
    assert str(error.value) == (
        "model.attention.window is not an option of model.attention.name='linformer'; its options are: k, block_size"
    )
    with pytest.raises(ConfigError, match="its options are: window, n_global, implementation"):
        validate_model_config(make_config(attention={"name": "longformer", "k": 4}))


@pytest.mark.parametrize(
    ("attention", "positional"),
    [("standard", "alibi"), ("sdpa", "alibi"), ("longformer", "alibi"), ("linformer", "rope")],
)
def test_runs_in_bfloat16(build, attention, positional):
    model = _model(build, attention, positional).to(torch.bfloat16)  # ALiBi's bias is fp32: cast, no dtype clash
    logits = model(_ids())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ------------------------------------------------------------------ sdpa with attention dropout on a CPU


def _qkv(batch: int, heads: int, n: int, dim: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, heads, n, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 5, 20])
def test_chunked_dropout_attention_without_dropout_is_the_reference_math(alibi, chunk):
    """Forced through the chunked path with p=0, every chunk size gives softmax(QK^T/sqrt(d) + bias)V, values and
    gradients (the causal prefix a chunk reads drops only masked keys)."""
    q, k, v = _qkv(2, 3, 13, 4)
    inputs = _inputs(13, 13, 3, alibi)
    reference = dropout_attention(q, k, v, inputs.causal_mask, inputs.bias, 0.0)
    chunked = chunked_dropout_attention(q, k, v, inputs, 0.0, chunk_size=chunk)
    assert_close(chunked, reference, rtol=0, atol=1e-12)
    assert_close(torch.autograd.grad(chunked.sum(), (q, k, v)), torch.autograd.grad(reference.sum(), (q, k, v)))
    if not alibi:
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_close(chunked, sdpa, rtol=0, atol=1e-12)


def test_one_chunk_with_dropout_draws_the_reference_mask():
    """With dropout and one chunk over all queries, the same seed gives the reference's values exactly."""
    q, k, v = _qkv(2, 3, 9, 4)
    inputs = _inputs(9, 9, 3, False)
    torch.manual_seed(7)
    chunked = chunked_dropout_attention(q, k, v, inputs, 0.3, chunk_size=9)
    torch.manual_seed(7)
    reference = dropout_attention(q, k, v, inputs.causal_mask, None, 0.3)
    assert torch.equal(chunked, reference)
    assert not torch.equal(chunked, dropout_attention(q, k, v, inputs.causal_mask, None, 0.0))  # dropout acted


def test_recomputed_chunks_reuse_the_forward_dropout_masks():
    """The backward pass recomputes each chunk (activation checkpointing) with the forward's dropout mask: the
    gradients equal those of the same chunks kept for the backward pass, under the same seed."""
    q, k, v = _qkv(2, 2, 11, 4)
    inputs = _inputs(11, 11, 2, False)
    results = []
    for recompute in (True, False):
        torch.manual_seed(3)
        out = chunked_dropout_attention(q, k, v, inputs, 0.4, chunk_size=4, recompute=recompute)
        results.append((out, torch.autograd.grad((out * torch.arange(4.0, dtype=out.dtype)).sum(), (q, k, v))))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)


class _LargestSaved:
    """Largest tensor autograd keeps for the backward pass (elements)."""

    def __init__(self):
        self.largest = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, tensor.numel())
        return tensor


def test_sdpa_with_dropout_on_cpu_keeps_no_length_by_length_tensor(monkeypatch):
    """Training sdpa with attention dropout: no (B, H, T, T) tensor is created, in forward or backward, and none
    is kept for the backward pass; the largest created is one chunk's (B, H, C, T) weights."""
    batch, heads, n, dim = 2, 2, 64, 4
    monkeypatch.setattr(attention_module, "DROPOUT_CHUNK_ELEMENTS", batch * heads * 8 * n)  # chunks of 8 queries
    q, k, v = _qkv(batch, heads, n, dim)
    config = tiny_config(n_heads=heads, d_model=heads * dim, attention={"name": "sdpa"}, attention_dropout=0.1)
    layer = ATTENTION.build("sdpa", config).train()
    saved, inputs = _LargestSaved(), _inputs(n, n, heads, False)  # its (T, T) causal mask is built once a forward
    with _CreatedShapes() as created:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = layer.attend(q, k, v, inputs)
        out.sum().backward()
    assert out.shape == (batch, heads, n, dim)
    assert not any(shape[-2:] == (n, n) and math.prod(shape) >= batch * heads * n * n for shape in created.shapes)
    assert max(math.prod(shape) for shape in created.shapes) <= batch * heads * 8 * n
    assert saved.largest <= batch * heads * n * dim  # only q, k, v slices and outputs: O(T * D), not O(T * T)


def test_sdpa_without_dropout_or_in_eval_never_takes_the_chunked_path(build, monkeypatch):
    """The no-dropout and eval paths never reach the chunked path (they are the fused SDPA call, as before)."""

    def fail(*args, **kwargs):
        raise AssertionError("the chunked dropout path ran")

    monkeypatch.setattr(attention_module, "chunked_dropout_attention", fail)
    build(attention=ATTENTIONS["sdpa"], positional={"name": "rope"}).train()(_ids())  # dropout 0, training
    build(attention=ATTENTIONS["sdpa"], positional={"name": "rope"}, attention_dropout=0.2).eval()(_ids())
    with pytest.raises(AssertionError, match="chunked dropout path"):
        build(attention=ATTENTIONS["sdpa"], positional={"name": "rope"}, attention_dropout=0.2).train()(_ids())
