"""Starting from trained weights (``init_from=``) and evaluation-only runs (``trainer.max_steps=0``): what a
study's post-training arms do. The loaded weights score exactly what they scored when saved; pruning an
evaluation-only run prunes them at once; heads removed at the start are fine-tuned; a wrong checkpoint or a
run with nothing to evaluate is one clear error; and results.json keeps the training throughput."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tests.helpers import tiny_sequence_overrides
from tiny_decoder.core.errors import CheckpointError, ConfigError
from tiny_decoder.run.fit import fit_and_test

SMALL = ["+experiment=sequence_ablation", "model.d_model=16", "model.n_layers=2", "model.d_ff=32"]


def configure(compose_config, out: Path, *overrides: str):
    cfg = compose_config(*SMALL, *tiny_sequence_overrides(3), *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


@pytest.fixture
def trained(compose_config, tmp_path: Path):
    run = fit_and_test(configure(compose_config, tmp_path / "base"))  # tested: the task holds the best weights
    return run, Path(run.results["best_checkpoint"])


def test_evaluation_only_scores_the_loaded_weights_exactly(compose_config, tmp_path, trained):
    run, last = trained
    again = fit_and_test(configure(compose_config, tmp_path / "eval", "trainer.max_steps=0", f"init_from={last}"))
    assert again.trainer.global_step == 0
    assert again.results["val"]["val/loss"] == pytest.approx(run.results["best_score"], rel=1e-6)
    for name, weight in again.task.state_dict().items():
        assert torch.equal(weight, run.task.state_dict()[name]), name
    # the training run logged its throughput (Lightning's ThroughputMonitor; kept through the test): tokens/s =
    # samples/s x 8 tokens
    train = run.results["train"]
    assert train["train/device/items_per_sec"] == pytest.approx(8 * train["train/device/samples_per_sec"])


def test_evaluation_only_magnitude_pruning_prunes_the_loaded_weights_at_once(compose_config, tmp_path, trained):
    run, last = trained
    options = ["trainer.max_steps=0", f"init_from={last}", "pruning=magnitude", "pruning.sparsity=0.75"]
    pruned = fit_and_test(configure(compose_config, tmp_path / "pruned", *options))
    masks = [buffer for name, buffer in pruned.task.model.named_buffers() if name.endswith("weight_mask")]
    assert masks and all(float((mask == 0).float().mean()) == pytest.approx(0.75, abs=0.01) for mask in masks)
    assert pruned.results["val"]["val/loss"] != pytest.approx(run.results["best_score"], rel=1e-6)
    up = pruned.task.model.blocks[0].ff.up  # survivors keep their trained values; the rest are zero
    trained_weight = run.task.state_dict()["model.blocks.0.ff.up.weight"]
    assert torch.equal(up.weight_orig, trained_weight)
    assert torch.equal(up.weight, trained_weight * up.weight_mask)


def test_heads_removed_at_the_start_are_fine_tuned(compose_config, tmp_path, trained):
    _, last = trained
    options = [f"init_from={last}", "pruning=heads", "pruning.at=start", "pruning.amount=3", "pruning.batches=1"]
    tuned = fit_and_test(configure(compose_config, tmp_path / "heads", *options))
    heads = [block.attn.n_heads for block in tuned.task.model.blocks]
    assert sum(heads) == 2 * 4 - 3
    assert tuned.trainer.global_step > 0  # trained after the removal, on the smaller projections
    assert tuned.results["parameters"] == tuned.task.model.num_parameters()
    saved = torch.load(tmp_path / "heads" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert saved["model.blocks.0.attn.qkv.weight"].shape[0] == 3 * 16 // 4 * heads[0]


def test_nothing_to_evaluate_or_a_wrong_checkpoint_is_one_clear_error(compose_config, tmp_path, trained):
    _, last = trained
    with pytest.raises(ConfigError, match=r"trainer.max_steps=0 evaluates trained weights .* init_from=PATH.ckpt"):
        fit_and_test(configure(compose_config, tmp_path / "none", "trainer.max_steps=0"))
    differs = r"init_from=.*ckpt: the checkpoint's model differs from this run's: "
    with pytest.raises(CheckpointError, match=differs + r"model.d_model: 16 in the checkpoint, 32 here"):
        fit_and_test(configure(compose_config, tmp_path / "wide", "model.d_model=32", f"init_from={last}"))
    # the same shapes, another function: named too
    with pytest.raises(CheckpointError, match=differs + r"model.norm.eps: 1e-05 in the checkpoint, 0.001 here"):
        fit_and_test(configure(compose_config, tmp_path / "eps", "norm.eps=1e-3", f"init_from={last}"))
    tuned = fit_and_test(configure(compose_config, tmp_path / "dropout", "model.dropout=0.2", f"init_from={last}"))
    assert tuned.task.model.config.dropout == 0.2  # regularisation may differ
    with pytest.raises(CheckpointError, match=r"init_from=.*missing.ckpt: no such checkpoint file"):
        fit_and_test(configure(compose_config, tmp_path / "gone", f"init_from={tmp_path / 'missing.ckpt'}"))
