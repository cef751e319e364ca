"""The fast decoding step (``tiny_decoder.model.fast_decoding``, ``generate``'s default): the same tokens and
logits as the model's own forward, for every model family it covers, every batch size and past the context;
its opt-in weight formats (bf16, int8, int4) measured against fp32."""

from __future__ import annotations

import pytest
import torch

from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.model.decoding_weights import (
    Int4Kernel,
    Int4Weights,
    Int8Weights,
    quantize_int4,
    quantize_int8,
    weight_format,
)
from tiny_decoder.model.fast_decoding import PREPARED_WEIGHTS, FastDecoder, fast_decoding_problem
from tiny_decoder.model.generation import generate

FAMILIES = {
    "llama": dict(activation={"name": "swiglu"}, norm={"placement": "pre", "kind": "rmsnorm", "eps": 1e-5},
                  positional={"name": "rope"}, attention={"name": "sdpa"}),
    "gpt2": dict(activation={"name": "gelu"}, norm={"placement": "pre", "kind": "layernorm"}, bias=True,
                 positional={"name": "learned"}, attention={"name": "standard"}),
    "sinusoidal": dict(activation={"name": "relu"}, positional={"name": "sinusoidal"}, tie_embeddings=False),
}  # fmt: skip


def model_of(family: str, seed: int = 0, init_std: float = 0.1) -> DecoderTransformer:
    config = ModelConfig(vocab_size=256, context_length=32, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                         init_std=init_std, **FAMILIES[family])  # fmt: skip
    torch.manual_seed(seed)
    model = DecoderTransformer(config).eval()
    with torch.no_grad():  # non-trivial norm gains and shifts, which the fast step folds into the matrices
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def prompt_of(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_step_logits_equal_the_full_forward_at_every_position(family):
    """Prompt in one go, then one token at a time, then a chunk of 3 (the masked prefill after a cache offset):
    each step's logits equal the full forward's at that position (fp32 rounding)."""
    model = model_of(family)
    assert fast_decoding_problem(model) is None
    tokens = prompt_of(3, 20)
    decoder = FastDecoder(PREPARED_WEIGHTS.get(model, "model"), batch_size=3)
    with torch.no_grad():
        full = model(tokens)
        steps = [decoder(tokens[:, :5])] + [decoder(tokens[:, n : n + 1]) for n in range(5, 17)]
        steps.append(decoder(tokens[:, 17:20]))
    positions = [4, *range(5, 17), 19]
    for position, logits in zip(positions, steps, strict=True):
        torch.testing.assert_close(logits, full[:, position], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_greedy_decoding_equals_the_module_path_and_recomputation_past_the_context(family):
    model = model_of(family)
    prompt = prompt_of(3, 10)
    fast = generate(model, prompt, 30)  # 40 > context 32: the last steps re-encode the cropped window
    assert torch.equal(fast, generate(model, prompt, 30, fast=False))
    assert torch.equal(fast, generate(model, prompt, 30, use_cache=False))


def test_fast_sampling_equals_the_module_path_with_the_same_generator():
    model = model_of("llama", init_std=0.05)
    prompt = prompt_of(4, 3)
    fast, module = (
        generate(
            model,
            prompt,
            25,
            temperature=1.0,
            top_k=40,
            top_p=0.95,
            generator=torch.Generator().manual_seed(5),
            fast=flag,
        )  # fmt: skip
        for flag in (True, False)
    )
    assert torch.equal(fast, module)


def test_fast_step_follows_weight_changes():
    model = model_of("llama")
    prompt = prompt_of(1, 4)
    before = generate(model, prompt, 12)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(7)
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)  # in place: the prepared copies are stale
    after = generate(model, prompt, 12)
    assert not torch.equal(after, before)
    assert torch.equal(after, generate(model, prompt, 12, fast=False))


def test_models_the_fast_step_does_not_cover_decode_through_the_module_path():
    config = ModelConfig(vocab_size=64, context_length=16, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                         positional={"name": "alibi"})  # fmt: skip
    model = DecoderTransformer(config).eval()
    assert "rope, learned, sinusoidal or no positions" in fast_decoding_problem(model)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    assert torch.equal(generate(model, prompt, 8), generate(model, prompt, 8, fast=False))
    with pytest.raises(ValueError, match="weights=int8 needs the fast decoding step"):
        generate(model, prompt, 8, weights="int8")
    assert "fp32 or fp64" in fast_decoding_problem(model_of("llama").to(torch.bfloat16))
    wrapped = model_of("llama")
    wrapped.head = HotHead(wrapped.head, token=7)  # a subclass computing something else than its weight says
    assert "plain nn.Linear projections and head" in fast_decoding_problem(wrapped)
    assert generate(wrapped, prompt, 8)[0, 3:].tolist() == [7] * 8


class HotHead(torch.nn.Linear):
    """A head that always favours ``token``: the fast step, reading only the weight, would miss it."""

    def __init__(self, head: torch.nn.Linear, token: int):
        super().__init__(head.in_features, head.out_features, bias=False)
        self.weight = head.weight
        self.token = token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        logits[..., self.token] += 100.0
        return logits


def test_unknown_weight_format_names_the_choices():
    with pytest.raises(ConfigError, match="weights='int3' is unknown; choose one of: model, bf16, int8, int4"):
        weight_format("int3")
    with pytest.raises(ConfigError, match="weights=int8 runs on a CPU only"):
        Int8Weights().check(torch.device("cuda"))
    with pytest.raises(ConfigError, match="weights=int4 runs on a CPU only"):
        Int4Weights().check(torch.device("cuda"))


def test_int8_quantization_is_per_row_absmax():
    weight = torch.randn(16, 32)
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    torch.testing.assert_close(scale, weight.abs().amax(dim=1) / 127)
    assert float((q.float() * scale[:, None] - weight).abs().max()) <= float(scale.max()) / 2 + 1e-6


def test_int4_quantization_spans_each_group_in_fifteen_steps():
    """Each group of 32 inputs maps its minimum to 0 and its maximum to 15; dequantized weights are within half a
    step of the original."""
    weight = torch.randn(8, 64)
    q, scale, low = quantize_int4(weight, 32)
    groups = weight.view(8, 2, 32)
    torch.testing.assert_close(low, groups.amin(-1))
    torch.testing.assert_close(scale, (groups.amax(-1) - groups.amin(-1)) / 15)
    assert int(q.min()) == 0 and int(q.max()) == 15
    dequantized = q.view(8, 2, 32).float() * scale[..., None] + low[..., None]
    assert float((dequantized - groups).abs().max()) <= float(scale.max()) / 2 + 1e-6


@pytest.mark.parametrize(("outputs", "inputs"), [(864, 288), (50, 40)])
def test_int4_kernel_multiplies_by_its_dequantized_weights(outputs, inputs):
    """The packed kernel computes ``x W_q^T + b`` with ``W_q`` the dequantized int4 weights (to bfloat16
    rounding of the activations and scales), also where the shape needs padding (inputs to a multiple of 32,
    outputs to 16)."""
    weight, bias, x = torch.randn(outputs, inputs) * 0.02, torch.randn(outputs) * 0.1, torch.randn(3, inputs)
    kernel = Int4Kernel(weight, bias, torch.float32)
    padded = torch.nn.functional.pad(weight, (0, -inputs % 32))
    q, scale, low = quantize_int4(padded, 32)
    dequantized = (q.view(outputs, -1, 32) * scale[..., None] + low[..., None]).view(outputs, -1)[:, :inputs]
    reference = x @ dequantized.t() + bias
    out = kernel(x)
    assert out.shape == (3, outputs) and out.dtype == torch.float32
    assert float((out - reference).abs().max() / reference.abs().max()) < 0.01  # measured ~0.005
    assert float((out - (x @ weight.t() + bias)).abs().max() / reference.abs().max()) > 1e-4  # it is quantized


@pytest.mark.parametrize(
    ("weights", "max_error", "min_agreement"), [("bf16", 0.02, 0.95), ("int8", 0.03, 0.9), ("int4", 0.2, 0.75)]
)
def test_low_precision_weights_stay_close_to_fp32(weights, max_error, min_agreement):
    """Next-token logits of 64 random contexts: relative error and top-1 agreement against fp32 (measured here:
    bf16 ~0.5% error, int8 ~1%, agreement >= 0.97; int4 on these random weights 15%, agreement 0.81)."""
    model = model_of("llama", init_std=0.05)
    contexts = prompt_of(64, 12, seed=3)
    outputs = {}
    for name in ("model", weights):
        decoder = FastDecoder(PREPARED_WEIGHTS.get(model, name), batch_size=64)
        with torch.no_grad():
            outputs[name] = decoder(contexts)
    reference, low = outputs["model"], outputs[weights]
    assert float((low - reference).norm() / reference.norm()) < max_error
    assert float((low.argmax(-1) == reference.argmax(-1)).float().mean()) >= min_agreement


@pytest.mark.parametrize(("weights", "tolerance"), [("bf16", 1e-2), ("int8", 2e-3), ("int4", 2e-3)])
def test_low_precision_cached_decoding_equals_its_own_recomputation(weights, tolerance):
    """KV-cache decoding in a low-precision format: each step's logits are what the same format gives encoding
    the whole sequence at once (the cache adds no error of its own beyond its dtype: bf16 caches and attention
    differ by up to one bfloat16 step of the logits, 2^-7 at |logit| in [1, 2), between the one-token and the
    whole-sequence attention kernels), and greedy tokens past the context match the window re-encoded every
    step."""
    model = model_of("llama", init_std=0.05)
    tokens = prompt_of(2, 16)
    prepared = PREPARED_WEIGHTS.get(model, weights)
    incremental = FastDecoder(prepared, batch_size=2)
    with torch.no_grad():
        incremental(tokens[:, :4])
        steps = [incremental(tokens[:, n : n + 1]) for n in range(4, 16)]
        for n, logits in zip(range(5, 17), steps, strict=True):
            whole = FastDecoder(prepared, batch_size=2)(tokens[:, :n])
            torch.testing.assert_close(logits, whole, atol=tolerance, rtol=tolerance)
    decoded = generate(model, tokens[:, :4], 40, weights=weights)
    assert decoded.shape == (2, 44)


def test_traced_one_token_step_equals_the_eager_step_across_attention_buckets(monkeypatch):
    """The traced step (attention over a bucket of cache slots, the later ones masked) gives the eager step's
    logits at every position, across bucket boundaries, one trace per bucket reused by later decoders."""
    import tiny_decoder.model.fast_decoding as fast_decoding

    monkeypatch.setattr(fast_decoding, "ATTENTION_BUCKET", 8)
    model = model_of("llama")
    prepared = fast_decoding.PreparedWeights(model, weight_format("int8"))
    tokens = prompt_of(2, 30)
    for _ in range(2):  # the second decoder reuses the traces
        traced, eager = FastDecoder(prepared, 2), FastDecoder(prepared, 2, traced=False)
        with torch.no_grad():
            torch.testing.assert_close(traced(tokens[:, :3]), eager(tokens[:, :3]))
            for n in range(3, 30):
                torch.testing.assert_close(
                    traced(tokens[:, n : n + 1]), eager(tokens[:, n : n + 1]), atol=1e-5, rtol=1e-5
                )
    assert sorted(prepared.traced) == [(2, 8), (2, 16), (2, 24), (2, 32)]


def test_fast_generation_returns_tokens_training_can_use():
    """The fast loop runs in inference mode; the tokens it returns are a normal tensor (an inference tensor
    could not be saved for a backward pass), so a model can train on what it generated."""
    model = model_of("llama")
    tokens = generate(model, prompt_of(2, 3), 6)
    assert not tokens.is_inference()
    model.train()
    model(tokens).float().sum().backward()
    assert model.embedding.weight.grad is not None


def greedy_calls(monkeypatch) -> list[int]:
    """The token counts of every FastDecoder.greedy call from now on."""
    calls: list[int] = []
    original = FastDecoder.greedy

    def counted(self, logits, count, eos_id=None):
        calls.append(count)
        return original(self, logits, count, eos_id)

    monkeypatch.setattr(FastDecoder, "greedy", counted)
    return calls


def test_the_greedy_loop_decodes_what_the_generic_loop_does_and_only_within_the_context(monkeypatch):
    """Greedy decoding that fits the context runs the decoder's own loop (each argmax fed straight back in) and
    decodes the module path's tokens; sampling, and a continuation past the context, keep generate's loop."""
    calls = greedy_calls(monkeypatch)
    model = model_of("llama")
    prompt = prompt_of(3, 10)
    fitting = generate(model, prompt, 23)  # positions up to 10 + 23 - 1 = 32, the context
    assert calls == [23]
    assert torch.equal(fitting, generate(model, prompt, 23, fast=False))
    generate(model, prompt, 24)  # one token past the context: cropped windows, generate's loop
    generate(model, prompt, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    generate(model, prompt_of(8, 3), 5)  # batch 8: eager steps, not one call each
    assert calls == [23]


def test_the_greedy_loop_stops_where_every_row_has_emitted_eos():
    """With ``eos_id``, a row that emitted it keeps emitting it and decoding stops once every row has: the same
    tokens, and the same length, as the module path's loop."""
    model = model_of("gpt2")
    prompt = prompt_of(2, 4)
    free = generate(model, prompt, 20)
    eos_id = int(free[0, 9])  # row 0 emits it at new token 6 at the latest; row 1 maybe never
    fast, module = generate(model, prompt, 20, eos_id=eos_id), generate(model, prompt, 20, eos_id=eos_id, fast=False)
    assert torch.equal(fast, module)
    first = [(row == eos_id).nonzero()[0, 0].item() if (row == eos_id).any() else None for row in fast[:, 4:]]
    assert first[0] is not None and first[0] <= 5
    for row, at in zip(fast[:, 4:], first, strict=True):
        if at is not None:
            assert (row[at:] == eos_id).all()
    if all(at is not None for at in first):
        assert fast.shape[1] == 4 + max(first) + 1


def test_the_greedy_loop_refuses_what_it_cannot_hold():
    model = model_of("llama")
    prepared = PREPARED_WEIGHTS.get(model, "model")
    decoder = FastDecoder(prepared, batch_size=1)
    with torch.no_grad():
        logits = decoder(prompt_of(1, 10))
        with pytest.raises(ValueError, match="holds 32 positions; 24 greedy tokens after 10 would reach 33"):
            decoder.greedy(logits, 24)
        assert decoder.greedy(logits, 23).shape == (1, 23)
        with pytest.raises(ValueError, match="needs the compiled program or the traced one-token step"):
            FastDecoder(prepared, batch_size=1, traced=False).greedy(logits, 2)
