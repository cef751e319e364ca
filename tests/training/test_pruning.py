"""Pruning: magnitude pruning's exact sparsity on the chosen weights (local / global, repeated), masks that survive
optimizer steps, save/load and resume; head importance as |dL/d gate|, and a head-pruned model that is smaller
and computes exactly what the masked model computes (cached decoding and checkpoint reload included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from tests.helpers import tiny_sequence_overrides
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import DecoderTransformer, ModelConfig
from tiny_decoder.run.fit import fit_and_test
from tiny_decoder.tasks import load_task
from tiny_decoder.tasks.base import parameter_groups
from tiny_decoder.tasks.sequence_predictor import SequencePredictor
from tiny_decoder.training.pruning import (
    SPARSITY_SCHEDULES,
    MagnitudePruning,
    conform_to_state_dict,
    gate_heads,
    head_importance,
    heads_to_keep,
    prune_heads,
    pruned_count,
    sparsity,
    to_step,
)

TINY = dict(vocab_size=32, context_length=8, d_model=16, n_layers=2, n_heads=4, d_ff=32)


def _task(**overrides) -> SequencePredictor:
    torch.manual_seed(0)
    return SequencePredictor(model=ModelConfig(**{**TINY, **overrides}).to_dict())


def _pruner(task: SequencePredictor, **options) -> MagnitudePruning:
    pruner = MagnitudePruning(**options)
    pruner.setup(None, task, "fit")
    return pruner


def _batch(n: int = 4, vocab: int = 32) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, 9))
    return {"input": ids[:, :-1], "target": ids[:, 1:]}


def _save(task: SequencePredictor, path: Path) -> str:
    """What Lightning writes, as far as ``load_task`` reads it."""
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


# ----------------------------------------------------------------------------------------------- magnitude


@pytest.mark.parametrize("amount", [0.25, 0.5, 0.9])
def test_local_sparsity_is_exact_on_every_chosen_tensor_and_nothing_else(amount):
    task = _task()
    before = {name: p.detach().clone() for name, p in task.named_parameters()}
    pruner = _pruner(task, sparsity=amount)
    pruner.apply_pruning(amount)
    linears = [m for m in task.model.modules() if isinstance(m, nn.Linear)]
    assert [m for m, _ in pruner.pruned_parameters] == linears
    for module in linears:
        assert pruned_count(module, "weight") == round(amount * module.weight.numel())
        assert int((module.weight == 0).sum()) == pruned_count(module, "weight")
    for name, param in task.named_parameters():  # embeddings, norms, biases: untouched
        if not name.endswith("weight_orig"):
            assert torch.equal(param, before[name]) and name in before


def test_global_sparsity_is_exact_overall_with_one_threshold():
    task = _task()
    pruner = _pruner(task, sparsity=0.6, scope="global", modules=["attention", "feedforward"])
    pruner.apply_pruning(0.6)
    weights = pruner.pruned_parameters
    assert len(weights) == 2 * 2 * 2  # qkv, proj, two ff matrices per layer
    total = sum(m.weight.numel() for m, _ in weights)
    assert sum(pruned_count(m, "weight") for m, _ in weights) == round(0.6 * total)
    survivors = torch.cat([m.weight[m.weight_mask.bool()].abs() for m, _ in weights])
    pruned = torch.cat([m.weight_orig[~m.weight_mask.bool()].abs() for m, _ in weights])
    assert pruned.max() <= survivors.min()  # one magnitude threshold over all chosen tensors
    assert len({round(sparsity([w]), 3) for w in weights}) > 1  # ... so tensors end up differently sparse
    assert not hasattr(task.model.head, "weight_mask")


@pytest.mark.parametrize("scope", ["local", "global"])
def test_repeated_pruning_reaches_each_scheduled_sparsity_not_a_fraction_of_what_remains(scope):
    task = _task()
    pruner = _pruner(task, sparsity=0.8, scope=scope)
    total = sum(m.weight.numel() for m, _ in pruner.pruned_parameters)
    for target in (0.2, 0.5, 0.8):
        pruner.apply_pruning(target)
        assert sparsity(pruner.pruned_parameters) == pytest.approx(target, abs=len(pruner.pruned_parameters) / total)


def test_schedules():
    gradual, one_shot = SPARSITY_SCHEDULES.get("gradual"), SPARSITY_SCHEDULES.get("one_shot")
    assert [gradual(s, 10, 20) for s in (0, 10, 15, 20, 30)] == [0.0, 0.0, 1 - 0.5**3, 1.0, 1.0]
    assert [one_shot(s, 10, 20) for s in (9, 10, 11)] == [0.0, 1.0, 1.0]
    pruner = MagnitudePruning(sparsity=0.5, start_step=10, end_step=20, every_n_steps=5)
    assert [pruner.is_due(s) for s in (5, 10, 12, 15, 20, 21)] == [False, True, False, True, True, True]
    assert pruner.target(15) == pytest.approx(0.5 * (1 - 0.5**3))
    assert [to_step(0.25, 3000), to_step(0.75, 3000), to_step(700, 3000)] == [750, 2250, 700]


def test_selection_errors_are_clear():
    with pytest.raises(ConfigError, match="choose one of: linear, attention, feedforward, head, embedding"):
        MagnitudePruning(modules=["norms"])
    with pytest.raises(ConfigError, match="tied to the embedding"):
        _pruner(_task(tie_embeddings=True), modules=["head"])
    with pytest.raises(ConfigError, match="pruning.sparsity"):
        MagnitudePruning(sparsity=1.0)
    tied = _task(tie_embeddings=True)
    assert all(m is not tied.model.head for m, _ in _pruner(tied).pruned_parameters)  # default: head left out


def test_pruned_weights_stay_zero_after_optimizer_steps():
    task = _task()
    pruner = _pruner(task, sparsity=0.5)
    pruner.apply_pruning(0.5)
    groups = parameter_groups(task.model)
    assert any(p is task.model.blocks[0].attn.qkv.weight_orig for p in groups[0]["params"])  # still decayed
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    masks = {id(m): m.weight_mask.clone() for m, _ in pruner.pruned_parameters}
    for _ in range(5):
        optimizer.zero_grad()
        task.training_loss(_batch()).backward()
        optimizer.step()
    task(_batch()["input"])  # the forward pre-hook recomputes weight = weight_orig * mask
    for module, _ in pruner.pruned_parameters:
        assert torch.equal(module.weight_mask, masks[id(module)])
        assert torch.all(module.weight[module.weight_mask == 0] == 0)
        assert torch.any(module.weight_orig[module.weight_mask == 1] != 0)


def test_masks_survive_save_and_load(tmp_path):
    task = _task()
    _pruner(task, sparsity=0.7, scope="global").apply_pruning(0.7)
    loaded = load_task(_save(task, tmp_path / "pruned.ckpt"))
    for (name, module), (_, other) in zip(task.model.named_modules(), loaded.model.named_modules(), strict=True):
        if hasattr(module, "weight_mask"):
            assert torch.equal(other.weight_mask, module.weight_mask), name
    ids = _batch()["input"]
    assert_close(loaded(ids), task.eval()(ids), rtol=0, atol=0)
    fresh = _task(tie_embeddings=False)
    conform_to_state_dict(fresh, task.state_dict())
    fresh.load_state_dict(task.state_dict())  # strict: the reparametrisation was re-created


def test_cli_run_prunes_on_schedule_and_resume_keeps_the_masks(compose_config, tmp_path):
    options = ["pruning=magnitude", "pruning.sparsity=0.6", "pruning.start_step=0.2", "pruning.end_step=12"]
    options += ["pruning.every_n_steps=4", "model.d_model=16", "model.n_layers=1", "model.d_ff=32"]
    first = fit_and_test(compose_config("+experiment=sequence_ablation", *tiny_sequence_overrides(2), *options))
    assert first.results["val"]["prune/sparsity"] == pytest.approx(0.6)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert first.results["best_checkpoint"].endswith("step0000020.ckpt")  # judged at the final sparsity
    state = torch.load(last, weights_only=True)["state_dict"]
    masks = {k: v for k, v in state.items() if k.endswith("_mask")}
    assert masks and all(abs(float((m == 0).float().mean()) - 0.6) < 0.01 for m in masks.values())
    resumed = compose_config("+experiment=sequence_ablation", *tiny_sequence_overrides(3), *options, f"resume={last}")
    second = fit_and_test(resumed)
    assert second.trainer.global_step == 30
    after = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.equal(after[k], v) for k, v in masks.items())  # no new pruning: the target was reached
    assert json.loads((tmp_path / "results.json").read_text())["resumed_from"] == str(last)


# ----------------------------------------------------------------------------------------------- heads


def _float_model(**overrides) -> DecoderTransformer:
    torch.manual_seed(0)
    return DecoderTransformer(ModelConfig(**{**TINY, **overrides})).double().eval()


KEEP = [[0, 2, 3], [1]]


@pytest.mark.parametrize(
    "parts",
    [{}, {"attention": {"name": "standard"}, "positional": {"name": "rope"}}, {"norm": {"placement": "post"}}],
)
def test_head_pruned_model_equals_the_masked_model_and_is_smaller(parts):
    model = _float_model(**parts)
    ids = _batch(3)["input"]
    gate_heads(model, KEEP)
    masked = model(ids)
    gate_heads(model, [range(4), range(4)])
    assert not torch.allclose(model(ids), masked)
    for attention in (b.attn for b in model.blocks):
        attention.head_gate = None
    before = model.num_parameters()
    prune_heads(model, KEEP)
    assert [b.attn.n_heads for b in model.blocks] == [3, 1]
    head_params = 4 * 16 * 4 + 3 * 4  # per head: q, k, v rows + output columns (16 x 4 each), q/k/v biases
    assert model.num_parameters() == before - 4 * head_params
    assert_close(model(ids), masked, rtol=0, atol=1e-12)
    cache, pieces = model.new_cache(3), []
    for start, stop in ((0, 3), (3, 4), (4, 8)):
        pieces.append(model(ids[:, start:stop], cache))
    assert_close(torch.cat(pieces, dim=1), masked, rtol=0, atol=1e-12)


def test_head_pruned_state_dict_loads_into_a_fresh_model():
    model = _float_model()
    prune_heads(model, KEEP)
    fresh = _float_model()
    conform_to_state_dict(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    ids = _batch(2)["input"]
    assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_head_importance_is_the_gate_gradient():
    model = _float_model()
    batch = _batch(4)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # float64 throughout
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    importance = head_importance(model, loss_fn, [batch])
    attention, eps = model.blocks[1].attn, 1e-6
    for head in range(4):
        losses = []
        for sign in (1, -1):
            gate = torch.ones(4, dtype=torch.float64)
            gate[head] += sign * eps
            attention.head_gate = gate
            with torch.no_grad():
                losses.append(float(loss_fn(model(batch["input"]), batch["target"])))
        attention.head_gate = None
        assert importance[1][head] == pytest.approx(abs(losses[0] - losses[1]) / (2 * eps), rel=1e-4, abs=1e-7)
    assert all(a.head_gate is None for a in (b.attn for b in model.blocks))


def test_head_selection_per_layer_and_global():
    importance = [torch.tensor([0.1, 0.9, 0.5, 0.05]), torch.tensor([0.02, 0.01, 0.03, 0.04])]
    assert heads_to_keep(importance, 1, "layer", normalize=False) == [[0, 1, 2], [0, 2, 3]]
    assert heads_to_keep(importance, 3, "global", normalize=False) == [[0, 1, 2, 3], [3]]  # one head always stays
    assert heads_to_keep(importance, 4, "global", normalize=True) == [[1, 2], [2, 3]]  # per-layer L2 norms
    with pytest.raises(ConfigError, match="without heads"):
        heads_to_keep(importance, 4, "layer", normalize=False)
    with pytest.raises(ConfigError, match="only 6 heads to spare"):
        heads_to_keep(importance, 7, "global", normalize=False)


def test_cli_head_pruning_tests_and_saves_the_smaller_model(compose_config, tmp_path):
    options = ["pruning=heads", "pruning.amount=5", "pruning.batches=2"]
    run = fit_and_test(compose_config("+experiment=sequence_ablation", *tiny_sequence_overrides(1), *options))
    heads = [b.attn.n_heads for b in run.task.model.blocks]
    assert sum(heads) == 3 * 4 - 5 and min(heads) >= 1
    assert run.results["parameters"] == run.task.model.num_parameters() < 183360
    pruned = load_task(str(tmp_path / "checkpoints" / "pruned_heads.ckpt"))
    assert [b.attn.n_heads for b in pruned.model.blocks] == heads
    assert len(pruned.continue_sequence([1, 2, 3], 4)) == 4  # cached generation on the pruned model
    with pytest.raises(ConfigError, match="alibi"):
        fit_and_test(
            compose_config("+experiment=sequence_ablation", *tiny_sequence_overrides(1), *options, "positional=alibi")
        )
