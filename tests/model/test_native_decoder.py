"""The native int4 loop (``generate(..., compile=True, weights="int4")`` at batch 1 on a CPU,
:mod:`tiny_decoder.model.native_decoder`): the logits of the fp32 fast step over the same dequantized int4 weights at
every position, the same tokens at any thread count, its greedy loop's tokens and ``eos_id``, past the context, the
library built once and kept, and the models it does not cover decoded by the compiled program."""

from __future__ import annotations

import logging
import platform
import shutil

import pytest
import torch

from tests.model.test_fast_decoding import prompt_of
from tiny_decoder.model import DecoderTransformer, ModelConfig, native_decoder
from tiny_decoder.model.decoding_weights import ModelWeights
from tiny_decoder.model.fast_decoding import FastDecoder, PreparedWeights
from tiny_decoder.model.generation import generate
from tiny_decoder.model.native_decoder import NativeInt4Decoder, native_problem, pack_int4

pytestmark = pytest.mark.skipif(native_decoder.compiler() is None, reason="the native loop needs a C++ compiler")


def native_model(d_model: int = 64, n_heads: int = 4, seed: int = 0, **overrides) -> DecoderTransformer:
    """A llama-style model the loop covers (no biases, SwiGLU hidden a multiple of 32), norm gains not 1."""
    settings = dict(vocab_size=256, context_length=32, d_model=d_model, n_layers=2, n_heads=n_heads, d_ff=128,
                    bias=False, activation={"name": "swiglu", "multiple_of": 32}, positional={"name": "rope"},
                    norm={"placement": "pre", "kind": "rmsnorm", "eps": 1e-5}, attention={"name": "sdpa"})  # fmt: skip
    torch.manual_seed(seed)
    model = DecoderTransformer(ModelConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def dequantized_reference(model: DecoderTransformer) -> FastDecoder:
    """The eager fp32 fast step with every matrix replaced by its int4 values as the loop packs them."""
    weights = PreparedWeights(model, ModelWeights())
    matrices = [getattr(layer, name) for layer in weights.layers for name in ("qkv", "proj", "up", "down")]
    for kernel in [weights.head, *matrices]:
        inputs = kernel.weight_t.shape[0]
        q, sz = pack_int4(kernel.weight_t.t())
        rows = q.shape[0]
        values = torch.cat([(q & 15).view(rows, -1, 16), (q >> 4).view(rows, -1, 16)], dim=-1).float()
        weight = (values * sz[..., :1] + sz[..., 1:]).view(rows, -1)[:, :inputs]  # the padding's zeros cut off
        kernel.weight_t = weight.t().contiguous()
    return FastDecoder(weights, 1, traced=False)


@pytest.mark.parametrize(
    ("d_model", "n_heads", "multiple_of"),
    [(64, 4, 32), (96, 4, 32), (64, 8, 4)],  # head sizes 16 (vector loops), 24 and 8 (scalar); hidden 96 and 84
)
def test_native_logits_are_the_dequantized_int4_step_at_every_position(d_model, n_heads, multiple_of):
    """A 5-token prompt, then one token at a time to the end of the context: each step's logits are the fp32 step's
    over the dequantized int4 matrices (fp32 rounding: the loop sums in another order); a hidden width that is not
    a multiple of 32 (84: stories260K's is 172) is padded with zero weights."""
    model = native_model(d_model, n_heads, activation={"name": "swiglu", "multiple_of": multiple_of})
    assert (model.layers[0].ff.gate.out_features % 32 == 0) == (multiple_of == 32)
    assert native_problem(model) is None
    tokens = prompt_of(1, 32)
    native, reference = NativeInt4Decoder(model), dequantized_reference(model)
    with torch.inference_mode():
        torch.testing.assert_close(native(tokens[:, :5]), reference(tokens[:, :5]), atol=1e-5, rtol=1e-4)
        for n in range(5, 32):
            step = tokens[:, n : n + 1]
            torch.testing.assert_close(native(step), reference(step), atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="holds 32 positions; appending would reach 33"):
            native(tokens[:, :1])
        native.reset()
        with pytest.raises(IndexError, match=r"token ids must be in \[0, 256\), got 3..256"):
            native(torch.tensor([[3, 256]]))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_the_portable_vector_path_gives_the_same_logits(monkeypatch, tmp_path):
    """Built for a CPU without AVX-512 (x86-64-v2: the compiler's own vectors, the path ARM and AVX2 machines
    take), the loop gives the logits of this machine's build."""
    model, tokens = native_model(), prompt_of(1, 12)
    with torch.inference_mode():
        here = NativeInt4Decoder(model)
        expected = [here(tokens[:, :4])] + [here(tokens[:, n : n + 1]) for n in range(4, 12)]
        monkeypatch.setenv("TINY_DECODER_CACHE", str(tmp_path))
        monkeypatch.setattr(native_decoder, "_library", None)
        monkeypatch.setattr(native_decoder, "FLAGS", [f for f in native_decoder.FLAGS if f != "-march=native"]
                            + ["-march=x86-64-v2"])  # fmt: skip
        portable = NativeInt4Decoder(model)
        assert portable.library is not here.library
        got = [portable(tokens[:, :4])] + [portable(tokens[:, n : n + 1]) for n in range(4, 12)]
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_native_greedy_loop_matches_step_by_step_argmax_at_any_thread_count():
    """The loop's greedy continuation is the argmax fed back step by step; the tokens (each row of a product and
    each head summed by one thread, in one order) are the same at 1 and 2 threads; ``eos_id`` ends it."""
    model, threads = native_model(), torch.get_num_threads()
    prompt = prompt_of(1, 4)
    with torch.inference_mode():
        step_by_step = NativeInt4Decoder(model)
        logits, expected = step_by_step(prompt), []
        for _ in range(28):
            expected.append(int(logits.argmax()))
            logits = step_by_step(torch.tensor([[expected[-1]]]))
        runs = []
        try:
            for count in (1, 2):
                torch.set_num_threads(count)
                decoder = NativeInt4Decoder(model)
                runs.append(decoder.greedy(decoder(prompt), 28))
                assert decoder.length == 4 + 27
        finally:
            torch.set_num_threads(threads)
        assert runs[0].tolist() == [expected] and torch.equal(runs[0], runs[1])
        eos_id = expected[9]
        decoder = NativeInt4Decoder(model)
        stopped = decoder.greedy(decoder(prompt), 28, eos_id=eos_id)
        assert stopped.tolist() == [expected[: expected.index(eos_id) + 1]]
        decoder = NativeInt4Decoder(model)
        decoder(prompt)
        with pytest.raises(ValueError, match="30 greedy tokens after 4 would reach 33"):
            decoder.greedy(logits, 30)


def test_generate_with_int4_at_batch_one_runs_the_native_loop_also_past_the_context(monkeypatch):
    """``generate(compile=True, weights="int4")`` at batch 1: the native loop (its greedy loop where the tokens fit,
    the prompt re-encoded past the context), the dequantized reference's tokens; sampling steps through it too."""
    model = native_model()
    made = []
    original = NativeInt4Decoder.__init__
    monkeypatch.setattr(NativeInt4Decoder, "__init__", lambda self, m: (made.append(m), original(self, m))[1])
    prompt = prompt_of(1, 4)
    ours = generate(model, prompt, 40, compile=True, weights="int4")  # 44 > context 32
    reference, tokens = dequantized_reference(model), prompt.clone()
    with torch.inference_mode():
        for _ in range(40):
            window = tokens[:, -32:]
            reference.reset()
            tokens = torch.cat([tokens, reference(window).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, tokens)
    sampled = generate(model, prompt, 20, temperature=1.0, compile=True, weights="int4",
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert sampled.shape == (1, 24) and made == [model, model]


def test_models_the_loop_does_not_cover_decode_through_the_compiled_program(monkeypatch):
    """Biases, LayerNorm, widths that are not multiples of 32, batch 2: ``native_problem`` names what is missing and
    ``generate`` takes the compiled program (never the loop)."""
    monkeypatch.setattr(NativeInt4Decoder, "__init__", lambda *a: pytest.fail("the native loop was used"))
    biased = native_model(bias=True)
    assert native_problem(biased) == "the native int4 decoder needs no biases"
    assert native_problem(native_model(d_model=48, n_heads=4)) == (
        "the native int4 decoder needs model and attention widths that are multiples of 32"
    )
    assert "RMSNorm" in str(native_problem(native_model(norm={"placement": "pre", "kind": "layernorm"})))
    prompt = prompt_of(1, 4)
    compiled = generate(biased, prompt, 6, compile=True, weights="int4")
    assert torch.equal(compiled, generate(biased, prompt, 6, weights="int4"))
    model, two = native_model(), prompt_of(2, 4)
    assert generate(model, two, 6, compile=True, weights="int4").shape == (2, 10)


def test_the_library_is_built_once_and_a_failed_build_falls_back(monkeypatch, caplog, tmp_path):
    """The first use builds the library into the cache (one warning line); a later process loads it without
    building; a compiler error is a one-line warning and the compiled program decodes."""
    monkeypatch.setenv("TINY_DECODER_CACHE", str(tmp_path))
    monkeypatch.setattr(native_decoder, "_library", None)
    monkeypatch.setattr(native_decoder, "_unavailable", None)
    with caplog.at_level(logging.WARNING, logger="tiny_decoder.model.native_decoder"):
        native_decoder.library()
    assert len(list((tmp_path / "decoding").glob("int4_decoder-*.so"))) == 1
    assert "building the native int4 decoder, once" in caplog.text
    monkeypatch.setattr(native_decoder, "_library", None)
    with monkeypatch.context() as patch:
        patch.setattr(native_decoder.subprocess, "run", _only_version(native_decoder.subprocess.run))
        native_decoder.library()  # loaded from the cache: building again would fail the test

    monkeypatch.setattr(native_decoder, "_library", None)
    monkeypatch.setattr(native_decoder, "SOURCE", _broken_source(tmp_path))
    model, prompt = native_model(), prompt_of(1, 4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tiny_decoder.model.generation"):
        tokens = generate(model, prompt, 6, compile=True, weights="int4")
        again = generate(model, prompt, 6, compile=True, weights="int4")  # not built again: one warning
    assert torch.equal(tokens, again) and torch.equal(tokens, generate(model, prompt, 6, weights="int4"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "tiny_decoder.model.generation"]
    assert len(warnings) == 1 and "could not build broken.cpp" in warnings[0], warnings
    assert "decoding with the compiled program" in warnings[0]


def _only_version(run):
    def guarded(command, **kwargs):
        if "--version" not in command:
            pytest.fail(f"built again: {command}")
        return run(command, **kwargs)

    return guarded


def _broken_source(folder):
    path = folder / "broken.cpp"
    path.write_text("this is not C++\n")
    return path


def test_a_compiler_is_named_by_cxx(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert native_decoder.compiler() is None
    assert "a C++ compiler" in str(native_problem(native_model()))
    monkeypatch.setenv("CXX", shutil.which("g++") or shutil.which("clang++") or "g++")
    assert native_decoder.compiler() is not None


def test_auto_takes_the_native_loop_for_int4_at_batch_one_even_for_a_few_tokens(monkeypatch, tmp_path):
    """``compile="auto"`` (the generate tool's default) with ``weights=int4``: the native loop for a call of a few
    tokens too (its library builds in ~1 s, not a program's 15-25 s), where fp32 or batch 2 would decode eagerly;
    no AOTInductor program is compiled."""
    from tiny_decoder.model import compiled_step
    from tiny_decoder.model.generation import AUTO_COMPILE_FROM_TOKENS, compiles_auto

    monkeypatch.setenv("TINY_DECODER_CACHE", str(tmp_path))  # no program compiled yet, on disk or in memory
    monkeypatch.setattr(compiled_step, "LOADED", {})
    model, few = native_model(), AUTO_COMPILE_FROM_TOKENS - 1
    assert compiles_auto(model, 1, few, True, True, "int4")
    assert not compiles_auto(model, 1, few, True, True, "model") and not compiles_auto(
        model, 2, few, True, True, "int4"
    )
    monkeypatch.setattr(compiled_step, "compile_program", lambda *a, **k: pytest.fail("compiled a program"))
    prompt = prompt_of(1, 4)
    expected = generate(model, prompt, 3, compile=True, weights="int4")
    assert torch.equal(generate(model, prompt, 3, compile="auto", weights="int4"), expected)
