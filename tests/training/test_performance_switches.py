"""The speed switches: ``compile=true`` (compiled objective and evaluation forward give the eager numbers),
``precision=`` (reaches the Trainer), fused AdamW by default, and gradient clipping with a fused optimizer under
mixed precision (which Lightning's plugin refuses)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from tests.helpers import tiny_sequence_overrides
from tiny_decoder.run.build import build_run
from tiny_decoder.run.fit import fit_and_test
from tiny_decoder.tasks.language_model import LanguageModel
from tiny_decoder.training import optimizers
from tiny_decoder.training.optimizers import adamw, clip_gradients, unscales_in_step

TINY_LM = dict(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4, d_ff=64,
               positional={"name": "rope"}, norm={"placement": "pre", "kind": "rmsnorm"})  # fmt: skip


def _batch(seed: int = 0, size: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (size, 17), generator=torch.Generator().manual_seed(seed))
    return {"input": ids[:, :-1], "target": ids[:, 1:]}


def test_compiled_objective_and_evaluation_forward_equal_eager():
    torch.manual_seed(0)
    task = LanguageModel(TINY_LM)
    batch = _batch()
    eager_loss = task.training_loss(batch)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in task.parameters()]
    task.zero_grad()
    task.compile_steps()
    compiled_loss = task.objective(batch)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip((p.grad for p in task.parameters()), eager_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(task.logits(batch["input"]), task(batch["input"]), rtol=1e-5, atol=1e-6)
    assert task.is_compiled and "_compiled" not in "".join(task.state_dict())


def test_compile_true_trains_to_the_eager_weights(compose_config):
    """Same seed and data: 20 compiled steps end at the eager run's weights (up to float reassociation)."""
    overrides = (*tiny_sequence_overrides(epochs=1), "data.train_samples_per_epoch=640", "test=false")
    eager = fit_and_test(compose_config("+experiment=sequence_seed", *overrides)).task
    compiled = fit_and_test(compose_config("+experiment=sequence_seed", *overrides, "compile=true")).task
    assert compiled.is_compiled and not eager.is_compiled
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_precision_shortcut_and_fused_adamw_reach_the_trainer(compose_config):
    cfg = compose_config("+experiment=sequence_seed", *tiny_sequence_overrides(epochs=1), "precision=bf16-mixed")
    run = build_run(cfg)
    assert run.trainer.precision == "bf16-mixed"
    optimizer = run.task.optimizer_factory(run.task.parameters())
    assert optimizer.defaults["fused"] is True and unscales_in_step(optimizer)
    cfg = compose_config("+experiment=sequence_seed", *tiny_sequence_overrides(epochs=1), "optimizer.fused=false")
    assert not build_run(cfg).task.optimizer_factory(run.task.parameters()).defaults["fused"]


def test_adamw_falls_back_where_there_is_no_fused_kernel(monkeypatch):
    class NoFusedKernel(torch.optim.AdamW):
        def __init__(self, params, fused=None, **options):
            if fused:
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices"
                )
            super().__init__(params, fused=fused, **options)

    monkeypatch.setattr(optimizers.torch.optim, "AdamW", NoFusedKernel)
    assert not adamw([torch.nn.Parameter(torch.ones(3))], lr=0.1).defaults["fused"]
    with pytest.raises(RuntimeError, match="fused=True"):
        adamw([torch.nn.Parameter(torch.ones(3))], lr=0.1, fused=True)


def _params_with_grads(scale: float = 1.0) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    for p in params:
        p.grad = torch.randn_like(p) * 10 * scale  # true gradient norm ~ 60: clipping to 1 bites
    return params


def test_bf16_clipping_of_a_fused_optimizer_clips_like_full_precision():
    params = _params_with_grads()
    clip_gradients(MixedPrecision("bf16-mixed", "cpu"), adamw(params, lr=0.1), 1.0)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item() == pytest.approx(1.0)


def test_fp16_clipping_of_a_fused_optimizer_unscales_once_then_steps_like_the_loop():
    """With a GradScaler: unscale, clip, and the fused step must not unscale again (it would divide twice)."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert plugin.scaler.scale(torch.ones(())).item() == 1024.0
    fused_params = _params_with_grads(scale=1024.0)  # gradients as scaled by scaler.scale(loss).backward()
    fused = adamw(fused_params, lr=0.1, fused=True)
    clip_gradients(plugin, fused, 1.0)
    plugin.scaler.step(fused)
    loop_params = _params_with_grads()
    torch.nn.utils.clip_grad_norm_(loop_params, 1.0)
    partial(torch.optim.AdamW, lr=0.1, fused=False)(loop_params).step()
    for got, expected in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(got, expected)


def test_exact_resume_seeds_the_cpu_generator_like_torch_manual_seed():
    """ExactResume seeds only the generators a step draws from (torch.manual_seed probes every backend)."""
    from tiny_decoder.training.callbacks import seed_generators

    seed_generators(1234, torch.device("cpu"))
    ours = torch.rand(5), torch.randn(3)
    torch.manual_seed(1234)
    assert all(torch.equal(a, b) for a, b in zip(ours, (torch.rand(5), torch.randn(3)), strict=True))
