"""The GPU path (``@pytest.mark.gpu``: skipped without CUDA / ROCm): bf16-mixed training steps against fp32, the
SDPA kernel chosen, fused AdamW with clipping under AMP, ``compile=true`` training, compiled and fast decoding
against eager, DDP on one device, the stories15M recipe's memory against its estimate.

Run them where a GPU is: ``python -m pytest tests/gpu -m gpu``. No GPU has run them yet (benchmarks/RESULTS.md
says so until one does).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run_module, tiny_sequence_overrides
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.model.generation import generate
from tiny_decoder.training.optimizers import adamw

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]
DEVICE = "cuda"


def llama_config(**overrides) -> ModelConfig:
    options = dict(vocab_size=512, context_length=128, d_model=128, n_layers=2, n_heads=4, d_ff=384,
                   activation={"name": "swiglu"}, norm={"placement": "pre", "kind": "rmsnorm", "eps": 1e-5},
                   positional={"name": "rope"}, attention={"name": "sdpa"}, dropout=0.0)  # fmt: skip
    options.update(overrides)
    return ModelConfig(**options)


def model_on_gpu(config: ModelConfig, seed: int = 0) -> DecoderTransformer:
    torch.manual_seed(seed)
    return DecoderTransformer(config).to(DEVICE)


def batch(config: ModelConfig, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (size, config.context_length + 1), generator=generator)
    return tokens[:, :-1].to(DEVICE), tokens[:, 1:].to(DEVICE)


def loss_of(model: DecoderTransformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def train_steps(autocast: bool, steps: int = 5, clip: float | None = None) -> tuple[list[float], DecoderTransformer]:
    """``steps`` AdamW steps (fused kernel) on one fixed batch; bf16 autocast when ``autocast``."""
    config = llama_config()
    model = model_on_gpu(config)
    optimizer = adamw(model.parameters(), lr=1e-3)
    assert optimizer.defaults["fused"], "AdamW should pick the fused kernel on a GPU"
    inputs, targets = batch(config)
    losses = []
    for _ in range(steps):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(model, inputs, targets)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses, model


def test_bf16_mixed_training_steps_follow_fp32():
    """Five steps: the bf16-autocast losses stay within 2% of fp32's, and both go down."""
    fp32, _ = train_steps(autocast=False)
    bf16, _ = train_steps(autocast=True)
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) / a < 0.02


def test_sdpa_uses_a_fused_kernel_on_the_gpu():
    """Under bf16 the model's attention runs with only the flash / memory-efficient kernels allowed (the math
    fallback disabled): it would raise if SDPA had to fall back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = llama_config()
    model = model_on_gpu(config).to(torch.bfloat16)
    inputs, targets = batch(config)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        loss = loss_of(model, inputs, targets)
        loss.backward()
    assert torch.isfinite(loss)
    q = torch.randn(2, 4, 128, 32, device=DEVICE, dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.cuda.synchronize()
    names = " ".join(event.name.lower() for event in profile.events())
    assert "flash" in names or "efficient" in names or "fmha" in names, names[:500]


CLIP = 0.01  # below the gradient norm of a random model on random tokens, so clipping acts


def test_fused_adamw_with_clipping_under_amp_matches_the_unfused_loop():
    """fp16 autocast with a GradScaler, fused AdamW, gradients unscaled then clipped (what
    ``training.optimizers.clip_gradients`` does under Lightning): the weights end where the for-loop AdamW's do."""
    config = llama_config()
    results = []
    for fused in (True, False):
        model = model_on_gpu(config)
        optimizer = adamw(model.parameters(), lr=1e-3, fused=fused)
        scaler = torch.amp.GradScaler(DEVICE)
        inputs, targets = batch(config)
        norms = []
        for _ in range(4):
            with torch.autocast(DEVICE, dtype=torch.float16):
                loss = loss_of(model, inputs, targets)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), norms))
    (fused_weights, fused_norms), (loop_weights, loop_norms) = results
    assert all(n > CLIP for n in fused_norms)  # the clip was active at every step
    assert fused_norms == pytest.approx(loop_norms, rel=1e-3)
    torch.testing.assert_close(fused_weights, loop_weights, atol=1e-4, rtol=1e-3)


def test_compiled_training_step_equals_eager():
    config = llama_config()
    inputs, targets = batch(config)
    eager = model_on_gpu(config)
    compiled_model = model_on_gpu(config)
    compiled = torch.compile(compiled_model)
    for model in (eager, compiled):
        loss_of(model, inputs, targets).backward()
    torch.testing.assert_close(
        loss_of(compiled, inputs, targets), loss_of(eager, inputs, targets), atol=1e-4, rtol=1e-4
    )
    for a, b in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3)


def test_compile_true_training_runs_through_the_train_tool(tmp_path: Path):
    result = run_module("tiny_decoder.train", "+experiment=sequence_strong", *tiny_sequence_overrides(epochs=1),
                        "trainer=gpu", "compile=true", "test=false", "data.batch_size=32", f"hydra.run.dir={tmp_path}",
                        timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_step"] == 640 // 32 and float(results["val"]["val/loss"]) > 0


@pytest.mark.parametrize("options", [{"compile": True}, {}, {"weights": "bf16"}])
def test_decoding_on_the_gpu_equals_eager(options):
    """The compiled step and the fast step (default) decode greedily what the module path does; bf16 weights
    agree on most tokens."""
    model = model_on_gpu(llama_config()).eval()
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    eager = generate(model, prompt, 40, fast=False)
    tokens = generate(model, prompt, 40, **options)
    if options.get("weights") == "bf16":
        assert float((tokens == eager).float().mean()) > 0.8
    else:
        assert torch.equal(tokens, eager)


def test_ddp_on_one_device(tmp_path: Path):
    result = run_module("tiny_decoder.train", "+experiment=sequence_strong", *tiny_sequence_overrides(epochs=1),
                        "trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=1", "test=false",
                        "data.batch_size=32", f"hydra.run.dir={tmp_path}", timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "results.json").read_text())["global_step"] == 640 // 32


def test_stories15m_training_memory_is_within_its_estimate():
    """One bf16-mixed AdamW step of the stories15M recipe's model at batch 32: the CUDA peak is at most the
    estimate (``run/memory.py``) plus 25%, and at least half of it (an estimate far above is no estimate)."""
    from tiny_decoder.run.memory import estimate_memory, precision

    config = llama_config(vocab_size=4096, context_length=256, d_model=288, n_layers=6, n_heads=6, d_ff=1152,
                          activation={"name": "swiglu", "multiple_of": 32}, tie_embeddings=True)  # fmt: skip
    batch_size = 32
    estimate = estimate_memory(config, batch_size, precision("bf16-mixed"))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = model_on_gpu(config)
    optimizer = adamw(model.parameters(), lr=1e-3)
    inputs, targets = batch(config, size=batch_size)
    for _ in range(2):  # the second step has the AdamW state allocated
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = loss_of(model, inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() - start
    assert 0.5 * estimate.step_bytes <= peak <= 1.25 * estimate.step_bytes, (peak, estimate.step_bytes)
