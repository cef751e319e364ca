"""The compiled one-token step (``generate(..., compile=True)`` on a CPU, :mod:`tiny_decoder.model.compiled_step`):
the eager fast step's logits and tokens, one program per shape kept on disk and loaded by later processes without
compiling (also for another checkpoint of the shape), the eager step where nothing can be compiled."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import time

import pytest
import torch

from tests.model.test_fast_decoding import model_of, prompt_of
from tiny_decoder.core.cache_dir import default_cache_dir
from tiny_decoder.model import compiled_step
from tiny_decoder.model.decoding_weights import weight_format
from tiny_decoder.model.fast_decoding import PREPARED_WEIGHTS, FastDecoder, PreparedWeights
from tiny_decoder.model.generation import AUTO_COMPILE_FROM_TOKENS, compiles_auto, generate

needs_a_compiler = pytest.mark.skipif(
    not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")),
    reason="compile=true needs a C++ compiler (inductor's): none on this machine",
)


def forget_loaded_programs() -> None:
    """What a new process starts from: no program in memory (the on-disk cache stays)."""
    compiled_step.LOADED.clear()
    compiled_step.UNAVAILABLE.clear()
    PREPARED_WEIGHTS.entries.clear()


@needs_a_compiler
@pytest.mark.parametrize("weights", ["model", "int8", "int4", "bf16"])
def test_compiled_step_gives_the_eager_fast_steps_logits(weights):
    """Every one-token step of a batch-2 decode: the compiled program's logits are the eager fast step's, with the
    KV cache written by the eager prompt step and read back by the program (and the other way round past a
    reset). bf16 (a bfloat16 KV cache and attention, whose sums the two order differently): within 1% of the
    eager step's logits (relative norm)."""
    model = model_of("llama")
    tokens = prompt_of(2, 30)
    eager = FastDecoder(PREPARED_WEIGHTS.get(model, weights, portable=True), 2, traced=False)
    prepared = PREPARED_WEIGHTS.get(model, weights, portable=True)
    compiled = FastDecoder(prepared, 2, program=compiled_step.compiled_step(prepared, 2))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(tokens[:, :5]), eager(tokens[:, :5]))  # the prompt: eager in both
        for n in range(5, 30):
            step = tokens[:, n : n + 1]
            ours, theirs = compiled(step), eager(step)
            if weights == "bf16":
                assert float((ours - theirs).norm() / theirs.norm()) < 0.01
            else:
                torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@needs_a_compiler
def test_compiled_generation_equals_eager_past_the_context_and_in_a_new_process():
    """``generate(compile=True)`` gives the eager tokens (greedy, past the context: the cropped window re-encoded);
    a later process (nothing in memory) loads the program from disk, in under 5 s, without compiling, also for
    another checkpoint of the same shape (the weights are the program's inputs, not baked in)."""
    model, other = model_of("llama"), model_of("llama", seed=5)
    prompt = prompt_of(1, 4)
    eager = generate(model, prompt, 40)  # 44 > context 32
    assert torch.equal(generate(model, prompt, 40, compile=True), eager)
    programs = sorted((default_cache_dir() / "decoding").glob("*.pt2"))
    assert programs, "no program written to the cache"

    forget_loaded_programs()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled_step, "compile_program", lambda *a, **k: pytest.fail("compiled again"))
        start = time.perf_counter()
        first = generate(model, prompt, 1, compile=True)
        warm_up = time.perf_counter() - start
        assert torch.equal(first, eager[:, :5])
        assert warm_up < 5, f"loading the compiled step took {warm_up:.1f} s"
        assert torch.equal(generate(other, prompt, 40, compile=True), generate(other, prompt, 40))
    assert sorted((default_cache_dir() / "decoding").glob("*.pt2")) == programs


@needs_a_compiler
def test_the_compiled_greedy_loop_feeds_each_argmax_back_into_the_program(monkeypatch):
    """Greedy decoding that fits the context runs the program in the decoder's own loop (the argmax written where
    the program reads its next ids): the module path's tokens, batch 1 and 2, with and without ``eos_id``."""
    from tests.model.test_fast_decoding import greedy_calls

    calls = greedy_calls(monkeypatch)
    model = model_of("llama")
    for batch in (1, 2):
        prompt = prompt_of(batch, 4)
        free = generate(model, prompt, 29, compile=True)  # positions up to 4 + 29 - 1 = 32, the context
        assert torch.equal(free, generate(model, prompt, 29, fast=False))
        eos_id = int(free[0, 10])
        stopped = generate(model, prompt, 29, compile=True, eos_id=eos_id)
        assert torch.equal(stopped, generate(model, prompt, 29, fast=False, eos_id=eos_id))
    assert calls == [29, 29, 29, 29]


def test_program_key_follows_shape_format_batch_and_settings():
    """One program per computation: the key changes with the batch size, the weight format, the model's shape and
    any setting the step reads (a norm's eps, the activation), and not with the weights' values; it is computed
    without tracing the step (milliseconds)."""

    def key(prepared, batch=1):
        return compiled_step.program_key(prepared, compiled_step.example_inputs(prepared, batch))

    def prepared_of(model, weights="model"):
        return PreparedWeights(model, weight_format(weights, portable=True))

    base = key(prepared_of(model_of("llama")))
    assert key(prepared_of(model_of("llama", seed=9))) == base
    variants = [key(prepared_of(model_of("llama")), batch=2), key(prepared_of(model_of("llama"), "int8")),
                key(prepared_of(model_of("llama"), "int4")), key(prepared_of(model_of("gpt2")))]  # fmt: skip
    other_eps, other_act = prepared_of(model_of("llama")), prepared_of(model_of("llama"))
    other_eps.layers[1].norm_ff.eps = 1e-3
    other_act.layers[0].act = torch.nn.GELU(approximate="tanh")
    variants += [key(other_eps), key(other_act)]
    assert len({base, *variants}) == 1 + len(variants)
    start = time.perf_counter()
    key(prepared_of(model_of("llama")))
    assert time.perf_counter() - start < 0.5
    # a module without readable source (a frozen install) keys on the package's version instead
    assert compiled_step.source_of(object()).endswith("of tiny_decoder " + importlib.metadata.version("tiny_decoder"))


@needs_a_compiler
def test_a_program_that_does_not_load_is_compiled_again(monkeypatch, caplog):
    """A truncated package in the cache: one warning, compiled again, the right tokens."""
    model = model_of("llama")
    prompt = prompt_of(1, 3)
    generate(model, prompt, 2, compile=True)
    program = PREPARED_WEIGHTS.get(model, "model", portable=True).compiled[(1, torch.get_num_threads())].path
    forget_loaded_programs()
    program.write_bytes(b"not a package")
    compiled_again = []
    real_compile = compiled_step.compile_program
    monkeypatch.setattr(compiled_step, "compile_program", lambda *a: compiled_again.append(1) or real_compile(*a))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(generate(model, prompt, 10, compile=True), generate(model, prompt, 10))
    assert compiled_again == [1] and "does not load" in caplog.text


def test_without_a_compiler_generation_decodes_eagerly_with_one_warning(monkeypatch, caplog):
    forget_loaded_programs()
    model = model_of("gpt2")  # a shape no other test compiles: nothing in the cache

    attempts = []

    def no_compiler(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("Failed to find C++ compiler. Please specify via CXX environment variable.")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    prompt = prompt_of(2, 3)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(generate(model, prompt, 12, compile=True), generate(model, prompt, 12))
    assert "could not compile the decoding step (RuntimeError: Failed to find C++ compiler" in caplog.text
    assert "decoding with the eager fast step" in caplog.text
    assert not list((default_cache_dir() / "decoding").glob("*.tmp-*"))
    generate(model, prompt, 2, compile=True)  # this process does not try that compilation again
    assert attempts == [1]
    forget_loaded_programs()


@needs_a_compiler
def test_auto_compiles_for_a_long_call_and_then_serves_short_ones(monkeypatch, tmp_path):
    """``compile="auto"`` (the generate tool's default): a call of fewer than ``AUTO_COMPILE_FROM_TOKENS`` new
    tokens decodes eagerly while no program is compiled (nothing compiled); a call of that many compiles it (the
    eager tokens); from then on, in a later process too, short calls use the program."""
    monkeypatch.setenv("TINY_DECODER_CACHE", str(tmp_path))  # no program of any shape yet
    forget_loaded_programs()
    compilations = []
    real_compile = compiled_step.compile_program
    monkeypatch.setattr(compiled_step, "compile_program", lambda *a: compilations.append(1) or real_compile(*a))
    model, prompt = model_of("llama"), prompt_of(1, 3)
    short, long = AUTO_COMPILE_FROM_TOKENS - 1, AUTO_COMPILE_FROM_TOKENS
    assert torch.equal(generate(model, prompt, short, compile="auto"), generate(model, prompt, short))
    assert compilations == [] and not compiles_auto(model, 1, short, True, True, "model")
    assert torch.equal(generate(model, prompt, long, compile="auto"), generate(model, prompt, long))
    assert compilations == [1]
    forget_loaded_programs()  # a later process: the program is on disk
    assert compiles_auto(model, 1, 2, True, True, "model")
    generate(model, prompt, 2, compile="auto")
    assert (1, torch.get_num_threads()) in PREPARED_WEIGHTS.get(model, "model", portable=True).compiled
    assert compilations == [1]
    # the module path (fast=False, no cache) and batch 2 (no program compiled for it) stay eager
    assert not compiles_auto(model, 1, 2, True, False, "model") and not compiles_auto(model, 1, 2, False, True, "model")
    assert not compiles_auto(model, 2, 2, True, True, "model")
    forget_loaded_programs()


def test_auto_without_a_compiler_decodes_eagerly_and_quietly(monkeypatch, caplog):
    """No C++ compiler (``$CXX`` names none): ``compile="auto"`` is the eager fast step, without a warning, and
    tries no compilation; ``compile=True`` would warn (test above). A value other than true / false / auto is an
    error naming the field."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(compiled_step, "compile_program", lambda *a: pytest.fail("compiled"))
    assert not compiled_step.compiler_found()
    model, prompt = model_of("llama"), prompt_of(1, 3)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(generate(model, prompt, 70, compile="auto"), generate(model, prompt, 70))
    assert caplog.text == ""
    with pytest.raises(ValueError, match="compile must be true, false or auto, got 'yes'"):
        generate(model, prompt, 2, compile="yes")
