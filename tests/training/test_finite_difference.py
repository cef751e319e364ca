"""Zeroth-order training: estimators against autograd, the MeZO invariants (restored parameters, the same
batch and RNG for every forward, reproducible seeds, no gradient-sized allocation), the optional parts
(momentum, line search, sensitivity, subsampling), and ``optimizer=finite_difference`` end to end."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import tiny_sequence_overrides
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.data.sequences import generate_sequences
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.run.fit import fit_and_test
from tiny_decoder.training.losses import distance_weighted_cross_entropy
from tiny_decoder.training.zeroth_order import HybridSchedule, ZerothOrderOptimizer, training_loss
from tiny_decoder.training.zeroth_order.per_tensor import relative_epsilon

TINY = dict(vocab_size=11, context_length=6, d_model=8, n_layers=1, n_heads=2, d_ff=16, attention={"name": "standard"})


def tiny_model(**overrides: Any) -> DecoderTransformer:
    """float64, GELU (smooth), no dropout unless asked: 840 parameters in 17 tensors."""
    torch.manual_seed(1234)
    return DecoderTransformer(ModelConfig.from_dict({**TINY, **overrides})).double()


def batch_loss(model: DecoderTransformer, seed: int = 0, batch: int = 4) -> Callable[[], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (batch, TINY["context_length"]), generator=generator)
    targets = torch.randint(0, TINY["vocab_size"], ids.shape, generator=generator)
    return lambda: F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


def autograd_gradient(model: DecoderTransformer, loss_fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_fn(), list(model.parameters())))


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def dense_estimate(optimizer: ZerothOrderOptimizer) -> torch.Tensor:
    """The pending estimate as one dense vector (tests only: the optimizer itself never builds it)."""
    estimate = optimizer.pending_estimate
    parts = [torch.zeros_like(p) for p in optimizer.parameter_set().tensors]
    for direction, scales in estimate.components():
        direction.add_to(parts, scales)
    return flat(parts)


def make_optimizer(model: DecoderTransformer, **options: Any) -> ZerothOrderOptimizer:
    return ZerothOrderOptimizer(model.parameters(), **{"lr": 0.0, "seed": 7, **options}).bind(model)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


# --------------------------------------------------------------------------------------------------
# Estimators against autograd


@pytest.mark.parametrize("parallel", ["sequential", "vmap"])
def test_coordinatewise_central_differences_match_autograd(parallel):
    model = tiny_model()
    loss_fn = batch_loss(model)
    optimizer = make_optimizer(model, estimator="coordinate", coordinates=None, eps=1e-5, parallel=parallel)
    optimizer.estimate(loss_fn)
    estimate, truth = dense_estimate(optimizer), flat(autograd_gradient(model, loss_fn))
    assert cosine(estimate, truth) > 0.9999
    assert torch.allclose(estimate, truth, rtol=1e-5, atol=1e-8)
    assert optimizer.stats["evaluations"] == 2 * truth.numel()


def test_forward_differences_are_first_order_accurate():
    model = tiny_model()
    loss_fn = batch_loss(model)
    optimizer = make_optimizer(model, estimator="coordinate", coordinates=None, scheme="forward", eps=1e-6)
    optimizer.estimate(loss_fn)
    assert cosine(dense_estimate(optimizer), flat(autograd_gradient(model, loss_fn))) > 0.9999
    assert optimizer.stats["evaluations"] == sum(p.numel() for p in model.parameters()) + 1


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_spsa_projected_gradient_is_the_directional_derivative(distribution):
    model = tiny_model()
    loss_fn = batch_loss(model)
    optimizer = make_optimizer(model, distribution=distribution, eps=1e-6)
    optimizer.estimate(loss_fn)
    direction = optimizer.pending_estimate.directions[0]
    z = [direction.component(t, p) for t, p in enumerate(optimizer.parameter_set().tensors)]
    derivative = sum((g * zt).sum() for g, zt in zip(autograd_gradient(model, loss_fn), z, strict=True))
    projected = optimizer.stats["projected_grad"]
    assert abs(projected - derivative) / abs(derivative) < 1e-5
    if distribution == "rademacher":
        assert all(set(zt.unique().tolist()) <= {-1.0, 1.0} for zt in z)


def test_averaging_spsa_directions_approaches_the_gradient():
    """cos(g_hat, g)^2 ~ n / (n + d + 1) for n Gaussian directions in d dimensions."""
    model = tiny_model()
    loss_fn = batch_loss(model)
    truth = flat(autograd_gradient(model, loss_fn))
    dimension = truth.numel()

    def mean_cosine(directions: int, seeds: int) -> float:
        values = []
        for seed in range(seeds):
            optimizer = make_optimizer(
                model, directions=directions, eps=1e-5, parallel="vmap", chunk_size=128, seed=seed
            )
            optimizer.estimate(loss_fn)
            values.append(cosine(dense_estimate(optimizer), truth))
        return sum(values) / len(values)

    cosines = {n: mean_cosine(n, seeds) for n, seeds in ((1, 8), (16, 4), (256, 1))}
    assert cosines[1] < cosines[16] < cosines[256]
    for n, value in cosines.items():
        expected = math.sqrt(n / (n + dimension + 1))
        assert 0.5 * expected < value < 1.6 * expected, (n, value, expected)


# --------------------------------------------------------------------------------------------------
# MeZO invariants


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"scheme": "forward", "distribution": "rademacher", "directions": 3},
        {"estimator": "coordinate", "coordinates": 50, "parallel": "vmap"},
        {"momentum": 0.9, "line_search": {"enabled": True}, "sensitivity": {"every": 2}, "epsilon": "sensitivity"},
        {"tensors": "uniform", "tensor_fraction": 0.5, "epsilon": "relative"},
    ],
)
def test_lr_zero_restores_the_parameters(options):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, **options)
    for seed in range(3):
        optimizer.step(batch_loss(model, seed))
    drift = max((p - b).abs().max().item() for p, b in zip(model.parameters(), before, strict=True))
    assert drift < 1e-12  # in-place +eps z / -2 eps z / +eps z walks: exact up to float64 rounding


def test_every_forward_sees_the_same_batch_and_rng_state():
    """With dropout active, each evaluation must draw the same mask: the central difference then equals
    autograd's directional derivative under the mask drawn from the step's initial RNG state."""
    model = tiny_model(dropout=0.3).train()
    loss_fn = batch_loss(model)
    seen: list[torch.Tensor] = []

    def recording_loss() -> torch.Tensor:
        loss = loss_fn()
        seen.append(torch.rand(3))  # where the global RNG stands after the model's dropout draws
        return loss

    state = torch.get_rng_state()
    optimizer = make_optimizer(model, eps=1e-6, directions=2)
    optimizer.estimate(recording_loss)
    assert len(seen) == 4 and all(torch.equal(s, seen[0]) for s in seen)
    direction = optimizer.pending_estimate.directions[0]
    torch.set_rng_state(state)
    gradient = autograd_gradient(model, recording_loss)
    z = [direction.component(t, p) for t, p in enumerate(model.parameters())]
    derivative = sum((g * zt).sum() for g, zt in zip(gradient, z, strict=True))
    first = optimizer.projected_gradients[0]  # the first direction's projected gradient
    assert abs(first - derivative) / abs(derivative) < 1e-5


def test_the_same_seed_gives_the_same_run():
    def run(seed: int) -> torch.Tensor:
        model = tiny_model()
        optimizer = ZerothOrderOptimizer(model.parameters(), lr=1e-2, seed=seed, directions=2, tensors="uniform")
        for step in range(4):
            optimizer.step(batch_loss(model, step))
        return flat([p.detach() for p in model.parameters()])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def peak_allocated_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU allocator's live bytes while ``fn`` runs, above what was live before (profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_spsa_never_allocates_a_gradient_or_a_parameter_copy():
    model = DecoderTransformer(ModelConfig.from_dict({**TINY, "vocab_size": 256, "d_model": 64, "d_ff": 256}))
    ids = torch.zeros(1, 2, dtype=torch.long)  # a tiny batch: activations far smaller than the parameters

    def loss_fn() -> torch.Tensor:
        return model(ids).square().mean()

    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    spsa = ZerothOrderOptimizer(model.parameters(), lr=1e-4, momentum=0.9, history=4)
    spsa.step(loss_fn)
    spsa_peak = peak_allocated_bytes(lambda: spsa.step(loss_fn))
    dense = ZerothOrderOptimizer(model.parameters(), lr=1e-4, momentum=0.9, momentum_mode="buffer")
    dense_peak = peak_allocated_bytes(lambda: dense.step(loss_fn))
    assert spsa_peak < largest + 0.25 * parameter_bytes  # one tensor's direction + the forward
    assert dense_peak >= parameter_bytes  # the dense momentum buffer: the contrast the test must detect


# --------------------------------------------------------------------------------------------------
# Momentum, line search, sensitivity, subsampling, configuration


def test_seed_momentum_equals_the_dense_buffer():
    def run(mode: str) -> torch.Tensor:
        model = tiny_model()
        optimizer = ZerothOrderOptimizer(
            model.parameters(), lr=1e-2, seed=1, momentum=0.8, momentum_mode=mode, history=10, directions=2
        )
        for step in range(5):
            optimizer.step(batch_loss(model, step))
        return flat([p.detach() for p in model.parameters()])

    assert torch.allclose(run("seeds"), run("buffer"), rtol=0, atol=1e-12)


def test_line_search_backtracks_until_the_batch_loss_decreases():
    model = tiny_model()
    loss_fn = batch_loss(model)
    optimizer = make_optimizer(model, lr=50.0, line_search={"enabled": True, "max_steps": 20}, directions=4)
    base = optimizer.step(loss_fn)
    assert 0 < optimizer.stats["step_size"] < 50.0
    assert loss_fn() <= base


def test_sensitivity_scores_track_per_tensor_gradient_norms():
    model = tiny_model()
    loss_fn = batch_loss(model)
    optimizer = make_optimizer(model, sensitivity={"every": 1, "ema": 0.9}, parallel="vmap", chunk_size=64)
    for _ in range(25):
        optimizer.step(loss_fn)
    scores = optimizer.sensitivity_scores()
    gradient = autograd_gradient(model, loss_fn)
    norms = {name: g.norm().item() for (name, _), g in zip(model.named_parameters(), gradient, strict=True)}
    assert set(scores) == set(norms) and optimizer.stats["sensitivity"] == scores
    names = [n for n in norms if norms[n] > 1e-8]
    log_scores = torch.tensor([math.log(scores[n]) for n in names])
    log_norms = torch.tensor([math.log(norms[n]) for n in names])
    assert torch.corrcoef(torch.stack([log_scores, log_norms]))[0, 1] > 0.9


def test_sensitivity_epsilon_and_sampling_follow_the_scores():
    model = tiny_model()
    optimizer = make_optimizer(
        model, epsilon="sensitivity", tensors="sensitivity", tensor_fraction=0.25, sensitivity={"every": 1}
    )
    optimizer.step(batch_loss(model))
    scores = torch.tensor(list(optimizer.sensitivity_scores().values()))
    eps = torch.tensor(optimizer.epsilons(optimizer.parameter_set()))
    inside = (eps > 1e-4 + 1e-12) & (eps < 1e-2 - 1e-12)  # not clamped by epsilon_range
    assert torch.allclose((eps * scores)[inside], (eps * scores)[inside][0], rtol=1e-9)  # equal loss change
    assert optimizer.stats["tensors"] == round(0.25 * len(scores))


def test_relative_epsilon_scales_with_the_tensor_rms():
    tensors = [torch.full((4,), 1.0), torch.full((4,), 0.5), torch.zeros(4)]
    assert relative_epsilon(tensors, 1e-3, (0.1, 10.0), None) == pytest.approx([1.549e-3, 7.746e-4, 1e-4], rel=1e-3)


def test_uniform_tensor_subsampling_updates_only_the_sampled_tensors():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, lr=1e-2, tensors="uniform", tensor_fraction=0.3)
    optimizer.step(batch_loss(model))
    changed = sum(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert changed == optimizer.stats["tensors"] == round(0.3 * len(before))


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    def optimizer_for(model: DecoderTransformer) -> ZerothOrderOptimizer:
        return make_optimizer(
            model, lr=1e-2, momentum=0.5, sensitivity={"every": 2}, estimator="coordinate", coordinates=20
        )

    model, other = tiny_model(), tiny_model()
    optimizer = optimizer_for(model)
    for step in range(3):
        optimizer.step(batch_loss(model, step))
    other.load_state_dict(model.state_dict())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed = optimizer_for(other)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    optimizer.step(batch_loss(model, 3))
    resumed.step(batch_loss(other, 3))
    assert torch.equal(flat(list(model.parameters())), flat(list(other.parameters())))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"estimator": "adjoint"}, "optimizer.estimator"),
        ({"distribution": "cauchy"}, "optimizer.distribution"),
        ({"scheme": "backward"}, "optimizer.scheme"),
        ({"epsilon": "auto"}, "optimizer.epsilon"),
        ({"parallel": "threads"}, "optimizer.parallel"),
        ({"epsilon": "sensitivity"}, "optimizer.sensitivity.every"),
        ({"eps": 0.0}, "optimizer.eps"),
        ({"hybrid": {"switch_step": 5}}, "optimizer.hybrid"),
    ],
)
def test_invalid_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        ZerothOrderOptimizer(tiny_model().parameters(), **options)


def test_hybrid_schedule_switches_either_way():
    adamw = torch.optim.AdamW
    assert [HybridSchedule(3, "finite_difference", adamw).phase_at(s) for s in (0, 2, 3, 9)] == [
        "finite_difference",
        "finite_difference",
        "backprop",
        "backprop",
    ]
    assert HybridSchedule(3, "backprop", adamw).phase_at(0) == "backprop"
    assert HybridSchedule().phase_at(10**6) == "finite_difference"


# --------------------------------------------------------------------------------------------------
# Training


def test_finite_differences_lower_the_loss_of_a_small_sequence_model():
    """n-SPSA on the sequence task's loss (its differentiable ``expected`` prediction), float64: 200 steps
    on one batch of sequences lower that batch's loss by more than 10%. (After 100 steps the drop is 8-21%
    depending on the initial weights, which torch's CPU RNG draws differently on different CPUs; after 200 it
    is 16-27% for the six seeds tried.)"""
    torch.manual_seed(0)
    config = dict(vocab_size=256, context_length=8, d_model=4, n_layers=1, n_heads=2, d_ff=16)
    model = DecoderTransformer(ModelConfig.from_dict({**config, "attention": {"name": "standard"}})).double()
    values = generate_sequences(np.random.default_rng(0), 64, 8, (1.0, 0.0, 0.0)).values

    def loss_fn() -> torch.Tensor:
        return distance_weighted_cross_entropy(model(values[:, :-1]), values[:, 1:], prediction="expected")

    optimizer = ZerothOrderOptimizer(model.parameters(), lr=1e-2, directions=8, parallel="vmap", seed=0).bind(model)
    with torch.no_grad():
        initial = loss_fn().item()
        losses = [optimizer.step(loss_fn).item() for _ in range(200)]
        final = loss_fn().item()
    assert final < 0.9 * initial, (initial, final)
    assert sum(losses[-10:]) < sum(losses[:10])  # the logged (pre-step) losses fall too


class _LoggingTask(L.LightningModule):
    """A task with no ``loss()`` nor ``training_loss()``: only a ``training_step`` that logs and returns."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.logged: list[str] = []

    def log(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.logged.append(name)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        loss = (self.weight * batch).sum()
        self.log("train/loss", loss)
        return {"loss": loss}


def test_training_loss_reuses_any_tasks_training_step_with_logging_muted():
    task = _LoggingTask()
    assert training_loss(task, torch.tensor([1.0, 2.0, 3.0]), 0).item() == 6.0
    assert task.logged == []
    task.log("restored")
    assert task.logged == ["restored"]


def _metrics(output_dir: Path) -> list[dict[str, str]]:
    (path,) = output_dir.glob("**/metrics.csv")
    return list(csv.DictReader(path.open()))


def test_optimizer_finite_difference_trains_end_to_end(compose_config, tmp_path):
    cfg = compose_config(
        "+experiment=sequence_fd",
        *tiny_sequence_overrides(epochs=1),
        "trainer.limit_train_batches=8",
        "trainer.log_every_n_steps=1",
        "optimizer.sensitivity.every=4",
    )
    run = fit_and_test(cfg)
    assert run.results["global_step"] == 8
    rows = _metrics(tmp_path)
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/loss", "train/projected_grad", "fd/epsilon", "fd/step_size"} <= logged
    assert any(key.startswith("fd/sensitivity/head") for key in logged)
    assert math.isfinite(run.results["test"]["test/loss"])


def test_hybrid_switches_from_finite_differences_to_backprop(compose_config, tmp_path):
    cfg = compose_config(
        "optimizer=finite_difference",
        *tiny_sequence_overrides(epochs=1),
        "model.d_model=16",
        "model.d_ff=32",
        "trainer.limit_train_batches=6",
        "trainer.log_every_n_steps=1",
        "optimizer.hybrid.switch_step=3",
        "test=false",
    )
    run = fit_and_test(cfg)
    phases = [float(row["fd/backprop"]) for row in _metrics(tmp_path) if row.get("fd/backprop")]
    assert phases == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert run.results["global_step"] == 6
    assert {"lr-ZerothOrderOptimizer/pg1", "lr-AdamW/pg1"} <= set(run.results["train"])
