"""Tests for the sequence families, batch generation and SequenceDataModule (tiny_decoder.data.sequences).

Each family's rule is re-checked here from the values alone, independently of the generator code.
"""

import re
from fractions import Fraction
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from tiny_decoder.data.curriculum import Curriculum
from tiny_decoder.data.sequences import (
    FAMILIES,
    FAMILY_NAMES,
    PHASES,
    SequenceDataModule,
    decode_family,
    families_in_phase,
    generate_sequences,
)

SAMPLES_PER_FAMILY = 200
N_TERMS = 9  # default: 8 inputs + the next number

EXPECTED_PHASE_FAMILIES = {
    1: {"constant", "arithmetic", "alternating"},
    2: {
        "alternating_steps",
        "growing_steps",
        "shrinking_steps",
        "geometric",
        "alternating_factors",
        "rational_factors",
        "two_step",
        "three_step",
        "mixed_periods",
    },
    3: {
        "fibonacci_mod",
        "double_every_third",
        "floor_geometric",
        "ceil_geometric",
        "alternating_signs",
        "parity_rule",
        "threshold_switch",
    },
}


# ---------------------------------------------------------------------------------------------------------
# Independent rule checks: each raises AssertionError when the values break the family's rule.
# ---------------------------------------------------------------------------------------------------------


def differences(x):
    return [b - a for a, b in zip(x, x[1:], strict=False)]


def assert_arithmetic(x):
    """Constant non-zero step (a single term has no step to check)."""
    steps = set(differences(x))
    assert len(steps) <= 1, f"not arithmetic: {x}"
    assert 0 not in steps, f"zero step: {x}"


def check_constant(x):
    assert len(set(x)) == 1


def check_arithmetic(x):
    assert_arithmetic(x)


def check_alternating(x):
    assert x[0] != x[1]
    assert all(x[i] == x[i - 2] for i in range(2, len(x)))


def check_alternating_steps(x):
    d = differences(x)
    assert d[0] != d[1] and 0 not in d[:2]
    assert all(d[i] == d[i - 2] for i in range(2, len(d)))


def check_growing_steps(x):
    second = set(differences(differences(x)))
    assert len(second) == 1 and second.pop() >= 1


def check_shrinking_steps(x):
    second = set(differences(differences(x)))
    assert len(second) == 1 and second.pop() <= -1


def obeys_factors_mod_256(x, factors):
    return all(x[i + 1] == factors[i % len(factors)] * x[i] % 256 for i in range(len(x) - 1))


def check_geometric(x):
    assert x[0] != 0
    assert any(obeys_factors_mod_256(x, (ratio,)) for ratio in (2, 3, 4))


def check_alternating_factors(x):
    assert x[0] != 0
    assert obeys_factors_mod_256(x, (2, 3)) or obeys_factors_mod_256(x, (3, 2))


def check_rational_factors(x):
    def obeys(first, second):
        operations = (first, second)
        return all(x[i + 1] == operations[i % 2](x[i]) for i in range(len(x) - 1))

    def halve(v):
        return v // 2

    def three_halves(v):
        return 3 * v // 2

    assert 0 not in x
    assert obeys(halve, three_halves) or obeys(three_halves, halve)


def check_blocks(x, size):
    blocks = [x[i : i + size] for i in range(0, len(x), size)]
    assert all(len(set(block)) == 1 for block in blocks), f"blocks not constant: {x}"
    assert_arithmetic([block[0] for block in blocks])


def check_two_step(x):
    check_blocks(x, 2)


def check_three_step(x):
    check_blocks(x, 3)


def check_mixed_periods(x):
    d = differences(x)
    assert d[0] != 0
    assert d == [0 if i % 3 == 1 else d[0] for i in range(len(d))]


def check_fibonacci_mod(x):
    assert any(x), "all-zero sequence"

    def obeys(m):
        return max(x) < m and all(x[i] == (x[i - 1] + x[i - 2]) % m for i in range(2, len(x)))

    assert any(obeys(m) for m in range(2, 11))


def check_double_every_third(x):
    assert all(x[i] % 2 == 0 for i in range(2, len(x), 3))
    assert_arithmetic([v // 2 if i % 3 == 2 else v for i, v in enumerate(x)])


NON_INTEGER_RATIOS = [Fraction(p, q) for p in range(2, 7) for q in range(2, 7) if p > q and p % q]


def check_rounded_geometric(x, rounding):
    def obeys(ratio):
        return all(x[i] == rounding(x[0] * ratio**i) for i in range(len(x)))

    assert x[0] >= 1
    assert any(obeys(ratio) for ratio in NON_INTEGER_RATIOS)


def check_floor_geometric(x):
    check_rounded_geometric(x, lambda value: value.numerator // value.denominator)


def check_ceil_geometric(x):
    check_rounded_geometric(x, lambda value: -(-value.numerator // value.denominator))


def check_alternating_signs(x):
    signed = [v - 128 for v in x]
    assert all((v > 0) if i % 2 == 0 else (v < 0) for i, v in enumerate(signed))
    assert_arithmetic([abs(v) for v in signed])


def check_parity_rule(x):
    increments = {b - a for a, b in zip(x, x[1:], strict=False) if a % 2 == 0}
    assert len(increments) == 1, f"no single increment: {x}"
    increment = increments.pop()
    assert increment >= 1
    assert all(b == 2 * a for a, b in zip(x, x[1:], strict=False) if a % 2 == 1)


def check_threshold_switch(x):
    pairs = list(zip(x, x[1:], strict=False))
    rises = {b - a for a, b in pairs if b > a}
    falls = {a - b for a, b in pairs if b < a}
    assert len(rises) == 1 and len(falls) == 1, f"needs one rise and one fall size: {x}"
    assert all(a != b for a, b in pairs)
    # A threshold T exists iff every value followed by a rise is below every value followed by a fall.
    assert max(a for a, b in pairs if b > a) < min(a for a, b in pairs if b < a)


RULE_CHECKS = {
    "constant": check_constant,
    "arithmetic": check_arithmetic,
    "alternating": check_alternating,
    "alternating_steps": check_alternating_steps,
    "growing_steps": check_growing_steps,
    "shrinking_steps": check_shrinking_steps,
    "geometric": check_geometric,
    "alternating_factors": check_alternating_factors,
    "rational_factors": check_rational_factors,
    "two_step": check_two_step,
    "three_step": check_three_step,
    "mixed_periods": check_mixed_periods,
    "fibonacci_mod": check_fibonacci_mod,
    "double_every_third": check_double_every_third,
    "floor_geometric": check_floor_geometric,
    "ceil_geometric": check_ceil_geometric,
    "alternating_signs": check_alternating_signs,
    "parity_rule": check_parity_rule,
    "threshold_switch": check_threshold_switch,
}


# ---------------------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------------------


def test_registry_matches_the_design_card():
    assert PHASES == (1, 2, 3)
    assert list(FAMILIES) == FAMILY_NAMES
    assert set(RULE_CHECKS) == set(FAMILIES)
    for phase in PHASES:
        assert set(families_in_phase(phase)) == EXPECTED_PHASE_FAMILIES[phase]
    for index, name in enumerate(FAMILY_NAMES):
        family = FAMILIES[name]
        assert family.name == name == decode_family(index)
        assert family.rule and "\n" not in family.rule


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_samples_are_in_range_and_obey_the_rule(name):
    rng = np.random.default_rng(123)
    samples = [FAMILIES[name].sample(rng, N_TERMS) for _ in range(SAMPLES_PER_FAMILY)]
    for values in samples:
        assert len(values) == N_TERMS
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in values), values
        RULE_CHECKS[name](values)
    assert len({tuple(values) for values in samples}) > 1, "parameters are not random"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_is_deterministic_given_the_rng(name):
    first = [FAMILIES[name].sample(np.random.default_rng(7), N_TERMS) for _ in range(3)]
    assert first[0] == first[1] == first[2]


@pytest.mark.parametrize("n_terms", [3, 16])
def test_families_work_for_short_and_longest_supported_windows(n_terms):
    rng = np.random.default_rng(0)
    for name, family in FAMILIES.items():
        for _ in range(20):
            values = family.sample(rng, n_terms)
            assert len(values) == n_terms and all(0 <= v <= 255 for v in values)
            RULE_CHECKS[name](values)


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
        ({"seq_len": 1}, "seq_len must be >= 2, got 1"),
        ({"seq_len": 16}, "seq_len must be <= 15"),
        ({"seq_len": 8.0}, "seq_len must be an integer"),
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
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
