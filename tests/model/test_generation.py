"""Tests for the decoding utilities: greedy, top-k, top-p, end-of-text handling and the KV cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.model.generation import filter_top_k, filter_top_p, generate, select_next_token

DRAWS = 4000


class ScriptedModel(nn.Module):
    """Ignores its input: at its ``n``-th call (0-based) row ``b`` predicts ``scripts[b][n]`` (no cache)."""

    def __init__(self, scripts: list[list[int]], vocab_size: int = 16, context_length: int = 64):
        super().__init__()
        self.scripts = scripts
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(context_length=context_length)
        self.calls = 0

    def new_cache(self, batch_size: int) -> None:
        return None

    def forward(self, ids: torch.Tensor, cache: None = None) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size)
        for row, script in enumerate(self.scripts):
            logits[row, -1, script[min(step, len(script) - 1)]] = 10.0
        return logits


def lm_sized_model(positional: str) -> DecoderTransformer:
    config = ModelConfig(
        vocab_size=512,
        context_length=32,
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_ff=128,
        tie_embeddings=True,
        positional={"name": positional},
    )
    torch.manual_seed(0)
    return DecoderTransformer(config).eval()


def test_temperature_zero_is_greedy():
    logits = torch.randn(64, 50)
    assert torch.equal(select_next_token(logits, temperature=0.0), logits.argmax(dim=-1))
    assert torch.equal(select_next_token(logits, temperature=0.0, top_k=3, top_p=0.5), logits.argmax(dim=-1))


def test_greedy_generation_follows_the_argmax_of_the_full_forward():
    model = lm_sized_model("rope")
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    tokens = generate(model, prompt, 10, temperature=0.0)
    for step in range(prompt.shape[1], tokens.shape[1]):
        with torch.no_grad():
            expected = model(tokens[:, :step])[:, -1].argmax(dim=-1)
        assert torch.equal(tokens[:, step], expected)


def test_top_k_never_samples_outside_the_top_k():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=generator).expand(DRAWS, 40)
    k = 5
    draws = select_next_token(logits, temperature=1.0, top_k=k, generator=generator)
    allowed = set(torch.topk(logits[0], k).indices.tolist())
    assert set(draws.tolist()) == allowed  # never outside, and (over many draws) every one of the k is used


def test_top_k_filter_keeps_exactly_k():
    logits = torch.randn(8, 30)
    kept = torch.isfinite(filter_top_k(logits, 7)).sum(dim=-1)
    assert kept.tolist() == [7] * 8


@pytest.mark.parametrize(("p", "expected"), [(0.3, {0}), (0.6, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_nucleus(p, expected):
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = set(torch.isfinite(filter_top_p(logits, p))[0].nonzero().flatten().tolist())
    assert kept == expected


def test_top_p_nucleus_is_minimal_on_random_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=generator) * 2
    p = 0.8
    kept = torch.isfinite(filter_top_p(logits, p))
    probs = torch.softmax(logits, dim=-1)
    mass = (probs * kept).sum(dim=-1)
    smallest_kept = torch.where(kept, probs, torch.inf).min(dim=-1).values
    assert bool((mass >= p - 1e-6).all())  # the nucleus reaches p ...
    assert bool((mass - smallest_kept < p).all())  # ... and is smallest: without its least likely token it does not
    assert bool((torch.where(kept, -torch.inf, probs).max(dim=-1).values <= smallest_kept).all())  # most likely kept


def test_top_p_samples_stay_in_the_nucleus():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, -1.0, -2.0, -3.0]]).expand(DRAWS, 6)
    draws = select_next_token(logits, temperature=1.0, top_p=0.7, generator=generator)
    nucleus = set(torch.isfinite(filter_top_p(logits[:1], 0.7))[0].nonzero().flatten().tolist())
    assert set(draws.tolist()) == nucleus


def test_eos_stops_generation_and_pads_finished_rows():
    eos = 1
    model = ScriptedModel([[5, 6, eos, 7, 7], [8, eos, 9, 9, 9]])
    prompt = torch.zeros(2, 2, dtype=torch.long)
    tokens = generate(model, prompt, max_new_tokens=10, eos_id=eos)
    assert tokens[:, 2:].tolist() == [[5, 6, eos], [8, eos, eos]]  # row 1 padded after its eos
    assert model.calls == 3  # stopped as soon as every row had emitted eos


def test_generation_stops_at_max_new_tokens_without_eos():
    model = ScriptedModel([[3, 4, 5]])
    tokens = generate(model, torch.zeros(1, 1, dtype=torch.long), max_new_tokens=6, eos_id=1)
    assert tokens.shape == (1, 7)
    assert tokens[0, 1:].tolist() == [3, 4, 5, 5, 5, 5]


@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_cache_on_and_off_give_identical_greedy_output_past_the_context(positional):
    model = lm_sized_model(positional)
    prompt = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(2))
    new_tokens = 40  # 10 + 40 > context 32: the window is cropped for the last 18 steps
    cached = generate(model, prompt, new_tokens, temperature=0.0, use_cache=True)
    uncached = generate(model, prompt, new_tokens, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 50)
    assert torch.equal(cached, uncached)


def test_generate_restores_training_mode():
    model = lm_sized_model("rope").train()
    generate(model, torch.zeros(1, 3, dtype=torch.long), 2)
    assert model.training


@pytest.mark.slow  # torch.compile: tens of seconds (the default suite keeps test_generate_compile_flag_*)
def test_compiled_decoding_equals_eager_and_follows_weight_changes():
    """The compiled static-cache step of the module path (``fast=False``: weights frozen into the graph) decodes
    like the eager cache, for two models in turn, and recompiles after the weights change in place (stale frozen
    weights would not). (The fast step's compiled program: tests/model/test_compiled_step.py.)"""
    first, second = lm_sized_model("rope"), lm_sized_model("learned")
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(3))
    for model in (first, second, first):
        eager = generate(model, prompt, 40, temperature=0.0)  # 45 > context 32: the last steps recompute
        assert torch.equal(generate(model, prompt, 40, temperature=0.0, compile=True, fast=False), eager)
    before = generate(first, prompt, 40)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(7)
        for parameter in first.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)  # in place: same tensors, new values
    after = generate(first, prompt, 40)
    assert not torch.equal(after[:, 6:], before[:, 6:])  # stale frozen weights would repeat `before`
    assert torch.equal(generate(first, prompt, 40, compile=True, fast=False), after)


@pytest.mark.slow  # torch.compile: tens of seconds (the default suite keeps test_generate_compile_flag_*)
def test_compiled_decoding_compiles_once_per_model_and_batch_shape():
    """Prompt and output lengths (the token buffer's strides) must not cause recompilations: a recompiled step
    would also miss the frozen-weight settings and run several times slower."""
    from torch._dynamo.utils import counters

    model = lm_sized_model("rope")
    generate(model, torch.zeros(1, 2, dtype=torch.long), 3, compile=True, fast=False)
    compiled = counters["stats"]["unique_graphs"]
    for prompt_length, new_tokens in ((1, 7), (4, 20), (9, 30)):
        generate(model, torch.ones(1, prompt_length, dtype=torch.long), new_tokens, compile=True, fast=False)
    assert counters["stats"]["unique_graphs"] == compiled
    generate(model, torch.ones(2, 3, dtype=torch.long), 5, compile=True, fast=False)  # a new batch: one graph
    assert counters["stats"]["unique_graphs"] == compiled + 1


def test_compiled_decoding_falls_back_to_eager_for_attentions_without_a_static_cache(caplog):
    config = ModelConfig(vocab_size=64, context_length=16, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                         attention={"name": "longformer", "window": 4})  # fmt: skip
    model = DecoderTransformer(config).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    assert torch.equal(generate(model, prompt, 8, compile=True), generate(model, prompt, 8))
    assert "cannot use a static KV cache" in caplog.text


@pytest.mark.slow  # processes / compilation: tens of seconds (CI runs -m slow too)
def test_generate_compile_flag_continues_like_eager():
    """``python -m tiny_decoder.generate ... compile=true`` (the task's generate_outputs) gives the eager output."""
    from tiny_decoder.tasks.base import GenerationRequest
    from tiny_decoder.tasks.sequence_predictor import SequencePredictor

    torch.manual_seed(0)
    config = dict(vocab_size=256, context_length=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, init_std=0.3)
    task = SequencePredictor(model=config).eval()
    eager, compiled = (
        task.generate_outputs(GenerationRequest(sequence="1 2 4 7 11", steps=8, compile=flag)) for flag in (False, True)
    )
    assert compiled == eager and len(eager[0].split("->")[1].split()) == 8
