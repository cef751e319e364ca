"""Tests for batch generation and SequenceDataModule (tiny_decoder.data.sequences).

Every drawn sequence is re-checked against its family's rule from the values alone (tests/data/sequence_rules.py).
"""

import re
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from tests.data.sequence_rules import EXPECTED_PHASE_FAMILIES, RULE_CHECKS
from tiny_decoder.data.curriculum import Curriculum
from tiny_decoder.data.sequence_families import FAMILIES, FAMILY_NAMES, PHASES, decode_family
from tiny_decoder.data.sequences import SequenceDataModule, generate_sequences

# ---------------------------------------------------------------------------------------------------------
# Batch generation
# ---------------------------------------------------------------------------------------------------------


def test_generated_batch_shapes_and_consistency():
    samples = generate_sequences(np.random.default_rng(0), 3000, 8, [1, 1, 1])
    assert samples.values.shape == (3000, 9) and samples.values.dtype == torch.int64
    assert samples.phase.shape == samples.family.shape == (3000,)
    assert samples.phase.dtype == samples.family.dtype == torch.int64
    assert int(samples.values.min()) >= 0 and int(samples.values.max()) <= 255
    assert set(samples.family.tolist()) == set(range(len(FAMILY_NAMES))), "some family never drawn"
    rows = zip(samples.values.tolist(), samples.phase.tolist(), samples.family.tolist(), strict=True)
    for values, phase, family in rows:
        name = decode_family(family)
        assert FAMILIES[name].phase == phase
        RULE_CHECKS[name](values)


def test_single_phase_mix_yields_only_that_phase():
    samples = generate_sequences(np.random.default_rng(0), 2000, 8, [0, 1, 0])
    assert set(samples.phase.tolist()) == {2}
    assert {decode_family(f) for f in samples.family.tolist()} == EXPECTED_PHASE_FAMILIES[2]


def test_phase_proportions_follow_the_mix():
    n = 20000
    phases = generate_sequences(np.random.default_rng(0), n, 8, [0.5, 0.25, 0.25]).phase
    proportions = [float((phases == phase).sum()) / n for phase in PHASES]
    np.testing.assert_allclose(proportions, [0.5, 0.25, 0.25], atol=0.02)


def test_same_seed_same_samples_and_different_seed_different_samples():
    first = generate_sequences(np.random.default_rng(5), 500, 8, [1, 2, 3])
    again = generate_sequences(np.random.default_rng(5), 500, 8, [1, 2, 3])
    other = generate_sequences(np.random.default_rng(6), 500, 8, [1, 2, 3])
    assert torch.equal(first.values, again.values) and torch.equal(first.family, again.family)
    assert not torch.equal(first.values, other.values)


@pytest.mark.parametrize("mix", [[1, 1], [1, 1, 1, 1], [1, -1, 1], [0, 0, 0], [1, float("inf"), 0]])
def test_invalid_phase_mix_is_rejected(mix):
    with pytest.raises(ValueError, match="phase_mix"):
        generate_sequences(np.random.default_rng(0), 10, 8, mix)


# ---------------------------------------------------------------------------------------------------------
# Data module
# ---------------------------------------------------------------------------------------------------------


def fake_trainer(epoch, reload_every=1):
    return SimpleNamespace(current_epoch=epoch, reload_dataloaders_every_n_epochs=reload_every)


def full_dataset(loader):
    return loader.dataset.inputs, loader.dataset.targets, loader.dataset.phase


def test_data_module_properties_and_batches():
    dm = SequenceDataModule(batch_size=16, train_samples_per_epoch=64, val_samples=20, test_samples=30)
    assert dm.vocab_size == 256 and dm.context_length == 8
    dm.setup("fit")
    for loader, size in ((dm.train_dataloader(), 64), (dm.val_dataloader(), 20), (dm.test_dataloader(), 30)):
        assert len(loader.dataset) == size
        batch = next(iter(loader))
        assert set(batch) == {"input", "target", "phase", "family"}
        assert batch["input"].shape == batch["target"].shape == (16, 8)
        assert batch["phase"].shape == batch["family"].shape == (16,)
        assert all(tensor.dtype == torch.int64 for tensor in batch.values())
        assert torch.equal(batch["target"][:, :-1], batch["input"][:, 1:]), "target is not input shifted"
        for inputs, targets, family in zip(batch["input"], batch["target"], batch["family"], strict=True):
            RULE_CHECKS[decode_family(family)]([*inputs.tolist(), int(targets[-1])])


def test_training_data_is_fresh_each_epoch_and_reproducible():
    dm = SequenceDataModule(train_samples_per_epoch=200)
    dm.trainer = fake_trainer(epoch=0)
    epoch0 = full_dataset(dm.train_dataloader())[0]
    dm.trainer = fake_trainer(epoch=1)
    epoch1 = full_dataset(dm.train_dataloader())[0]
    dm.trainer = fake_trainer(epoch=0)
    epoch0_again = full_dataset(dm.train_dataloader())[0]
    assert torch.equal(epoch0, epoch0_again)
    assert not torch.equal(epoch0, epoch1)
    dm.trainer = None  # no trainer attached: epoch 0
    assert torch.equal(full_dataset(dm.train_dataloader())[0], epoch0)


def test_training_mix_follows_the_curriculum():
    curriculum = Curriculum([{"epoch": 0, "mix": [1, 0, 0]}, {"epoch": 4, "mix": [0, 0, 1]}])
    dm = SequenceDataModule(train_samples_per_epoch=300, curriculum=curriculum)
    dm.trainer = fake_trainer(epoch=0)
    assert set(full_dataset(dm.train_dataloader())[2].tolist()) == {1}
    dm.trainer = fake_trainer(epoch=9)
    assert set(full_dataset(dm.train_dataloader())[2].tolist()) == {3}
    np.testing.assert_allclose(dm.train_mix, [0, 0, 1])
    dm.trainer = fake_trainer(epoch=2)
    dm.train_dataloader()
    np.testing.assert_allclose(dm.train_mix, [0.5, 0, 0.5])


def test_evaluation_sets_are_fixed_balanced_and_disjoint_from_training():
    dm = SequenceDataModule(train_samples_per_epoch=300, val_samples=300, test_samples=300, seed=1, val_seed=1)
    dm.setup()
    val_inputs, _, val_phase = full_dataset(dm.val_dataloader())
    test_inputs, _, _ = full_dataset(dm.test_dataloader())
    train_inputs, _, _ = full_dataset(dm.train_dataloader())
    assert not torch.equal(val_inputs, train_inputs), "val equals train even with the same seed"
    assert not torch.equal(val_inputs, test_inputs)
    assert set(val_phase.tolist()) == {1, 2, 3}
    dm.trainer = fake_trainer(epoch=3)
    dm.train_dataloader()
    assert torch.equal(full_dataset(dm.val_dataloader())[0], val_inputs), "val set must not change"
    rebuilt = SequenceDataModule(seed=1, val_seed=1, val_samples=300)
    assert torch.equal(full_dataset(rebuilt.val_dataloader())[0], val_inputs)
    order = [torch.cat([b["input"] for b in dm.val_dataloader()]) for _ in range(2)]
    assert torch.equal(order[0], order[1]) and torch.equal(order[0], val_inputs), "val loader shuffles"


def test_warns_when_dataloaders_are_not_reloaded_every_epoch():
    dm = SequenceDataModule(train_samples_per_epoch=10)
    dm.trainer = fake_trainer(epoch=0, reload_every=0)
    with pytest.warns(UserWarning, match="reload_dataloaders_every_n_epochs=1"):
        dm.train_dataloader()


class _RecordingModule(L.LightningModule):
    """Minimal module that records the first training batch of every epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.first_inputs = {}

    def training_step(self, batch, batch_idx):
        self.first_inputs.setdefault(self.current_epoch, batch["input"].clone())
        return (self.weight * batch["input"].float()).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_trainer_reloads_fresh_data_every_epoch():
    dm = SequenceDataModule(batch_size=8, train_samples_per_epoch=16, val_samples=8, test_samples=8)
    module = _RecordingModule()
    trainer = L.Trainer(
        max_epochs=2,
        reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    assert set(module.first_inputs) == {0, 1}
    assert not torch.equal(module.first_inputs[0], module.first_inputs[1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seq_len": 1}, "seq_len must be an integer >= 2, got 1"),
        ({"seq_len": 16}, "seq_len must be <= 15"),
        ({"seq_len": 8.0}, "seq_len must be an integer"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"train_samples_per_epoch": 0}, "train_samples_per_epoch"),
        ({"val_samples": -1}, "val_samples"),
        ({"test_samples": 0}, "test_samples"),
        ({"seed": -1}, "seed"),
        ({"val_seed": "1"}, "val_seed"),
        ({"test_seed": None}, "test_seed"),
        ({"num_workers": -1}, "num_workers"),
        ({"max_value": 100}, "max_value"),
        ({"curriculum": [{"epoch": 0, "mix": [1, 0, 0]}]}, "curriculum"),
    ],
)
def test_invalid_data_module_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        SequenceDataModule(**kwargs)
