"""Batches of integer sequences for next-number prediction, and the Lightning data module that serves them.

Contents
- `generate_sequences`: draws a batch of sequences for a given phase mix from the families of
  `data/sequence_families.py` (the 19 recurrence rules, their phases and registry).
- `SequenceDataset`: pre-generated sequences served as input / target / phase / family.
- `SequenceDataModule`: fresh training data every epoch (mix from a `Curriculum`), fixed validation and
  test sets; it accepts ``seq_len <= MAX_SEQ_LEN``, the longest window every family can fill within [0, 255].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from tiny_decoder.core.checks import check, check_int
from tiny_decoder.data.curriculum import Curriculum, normalised_mix
from tiny_decoder.data.sequence_families import (
    FAMILIES,
    FAMILY_IDS_BY_PHASE,
    FAMILY_NAMES,
    MAX_SEQ_LEN,
    MAX_VALUE,
    PHASES,
    decode_family,
)

# --------------------------------------------------------------------------------------------------------
# Batch generation
# --------------------------------------------------------------------------------------------------------

PhaseMix = Sequence[float] | np.ndarray  # weights of phases 1, 2, 3 (a curriculum's mix is an array)


@dataclass(frozen=True)
class SequenceSamples:
    """A batch of sequences: `values` (n, length + 1) int64, `phase` (n,) in 1..3, `family` (n,) ids."""

    values: torch.Tensor
    phase: torch.Tensor
    family: torch.Tensor

    def __len__(self) -> int:
        return len(self.values)


def normalise_mix(phase_mix: PhaseMix) -> np.ndarray:
    """Phase weights as probabilities; ConfigError unless 3 finite weights >= 0 with a positive sum."""
    return np.array(normalised_mix("phase_mix", phase_mix), dtype=np.float64)


def generate_sequences(rng: np.random.Generator, n: int, length: int, phase_mix: PhaseMix) -> SequenceSamples:
    """Draw n sequences of length + 1 terms: the phase from `phase_mix`, then a family uniformly within it."""
    check_int("n", n, 0)
    check_int("length", length, 1, hint=" (inputs before the next number)")
    probabilities = normalise_mix(phase_mix)
    phases = np.asarray(PHASES)[rng.choice(len(PHASES), size=n, p=probabilities)]
    family_ids = np.empty(n, dtype=np.int64)
    for phase in PHASES:
        rows = np.flatnonzero(phases == phase)
        candidates = FAMILY_IDS_BY_PHASE[phase]
        family_ids[rows] = candidates[rng.integers(0, len(candidates), size=len(rows))]
    samplers = [FAMILIES[name].sample for name in FAMILY_NAMES]
    values = np.array([samplers[family_id](rng, length + 1) for family_id in family_ids], dtype=np.int64)
    return SequenceSamples(
        values=torch.from_numpy(values.reshape(n, length + 1)),
        phase=torch.from_numpy(phases.astype(np.int64)),
        family=torch.from_numpy(family_ids),
    )


class SequenceDataset(Dataset):
    """Pre-generated sequences served as {"input", "target", "phase", "family"}; target = input shifted by 1."""

    def __init__(self, samples: SequenceSamples) -> None:
        self.inputs = samples.values[:, :-1]
        self.targets = samples.values[:, 1:]
        self.phase = samples.phase
        self.family = samples.family

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input": self.inputs[index],
            "target": self.targets[index],
            "phase": self.phase[index],
            "family": self.family[index],
        }


# --------------------------------------------------------------------------------------------------------
# Data module
# --------------------------------------------------------------------------------------------------------

UNIFORM_MIX = (1.0, 1.0, 1.0)
_VAL_STREAM, _TEST_STREAM = 1, 2


def _evaluation_rng(seed: int, stream: int) -> np.random.Generator:
    """Generator for a fixed evaluation set. The spawn key keeps it disjoint from every training stream
    ``default_rng([seed, epoch])`` (and from the other evaluation set), even when the seeds coincide."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


class SequenceDataModule(L.LightningDataModule):
    """Next-number prediction data: batches ``{"input": (B, seq_len), "target": (B, seq_len), "phase": (B,),
    "family": (B,)}`` (all int64), where target[:, t] is the number after input[:, t].

    Training data is fresh every epoch: `train_dataloader` draws `train_samples_per_epoch` sequences from
    ``np.random.default_rng([seed, epoch])`` with the phase mix ``curriculum.mix_at(epoch)`` (uniform when
    no curriculum is given). The caller must configure the trainer with ``reload_dataloaders_every_n_epochs=1``
    so this is called every epoch; otherwise the first epoch's data is reused (a warning says so).
    Validation and test sets are drawn once, phase-balanced, from `val_seed` / `test_seed`.
    """

    decode_family = staticmethod(decode_family)

    def __init__(
        self,
        *,
        seq_len: int = 8,
        batch_size: int = 32,
        train_samples_per_epoch: int = 32000,
        val_samples: int = 100,
        test_samples: int = 2000,
        seed: int = 0,
        val_seed: int = 1,
        test_seed: int = 2,
        curriculum: Curriculum | None = None,
        num_workers: int = 0,
        max_value: int = MAX_VALUE,
    ) -> None:
        super().__init__()
        check_int("data.seq_len", seq_len, 2)
        longest = f"<= {MAX_SEQ_LEN} (the longest window every family can fill within [0, {MAX_VALUE}])"
        check("data.seq_len", seq_len, lambda n: n <= MAX_SEQ_LEN, longest)
        for field, value in (
            ("batch_size", batch_size),
            ("train_samples_per_epoch", train_samples_per_epoch),
            ("val_samples", val_samples),
            ("test_samples", test_samples),
        ):
            check_int(f"data.{field}", value, 1)
        for field, value in (("seed", seed), ("val_seed", val_seed), ("test_seed", test_seed)):
            check_int(f"data.{field}", value, 0)
        check_int("data.num_workers", num_workers, 0)
        check_int("data.max_value", max_value, MAX_VALUE, hint=" (the generators produce values up to 255)")
        check(
            "data.curriculum",
            curriculum,
            lambda c: c is None or isinstance(c, Curriculum),
            "a Curriculum or None (in Hydra give it a _target_: tiny_decoder.data.curriculum.Curriculum)",
        )
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_samples_per_epoch = train_samples_per_epoch
        self.val_samples = val_samples
        self.test_samples = test_samples
        self.seed = seed
        self.val_seed = val_seed
        self.test_seed = test_seed
        self.curriculum = curriculum
        self.num_workers = num_workers
        self.max_value = max_value
        self.train_mix: np.ndarray | None = None  # the phase mix of the latest training epoch
        self._val_set: SequenceDataset | None = None
        self._test_set: SequenceDataset | None = None

    @property
    def vocab_size(self) -> int:
        return self.max_value + 1

    @property
    def context_length(self) -> int:
        return self.seq_len

    def phase_mix_at(self, epoch: float) -> np.ndarray:
        """Training phase probabilities at `epoch`."""
        if self.curriculum is None:
            return normalise_mix(UNIFORM_MIX)
        return self.curriculum.mix_at(epoch)

    def setup(self, stage: str | None = None) -> None:
        if self._val_set is None:
            self._val_set = self._evaluation_set(self.val_samples, _evaluation_rng(self.val_seed, _VAL_STREAM))
        if self._test_set is None:
            self._test_set = self._evaluation_set(self.test_samples, _evaluation_rng(self.test_seed, _TEST_STREAM))

    def train_dataloader(self) -> DataLoader:
        epoch = self._current_epoch()
        self.train_mix = self.phase_mix_at(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        samples = generate_sequences(rng, self.train_samples_per_epoch, self.seq_len, self.train_mix)
        return self._loader(SequenceDataset(samples), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self._val_set is not None  # made by setup()
        return self._loader(self._val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        assert self._test_set is not None  # made by setup()
        return self._loader(self._test_set, shuffle=False)

    def _evaluation_set(self, n: int, rng: np.random.Generator) -> SequenceDataset:
        return SequenceDataset(generate_sequences(rng, n, self.seq_len, UNIFORM_MIX))

    def _loader(self, dataset: SequenceDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def _current_epoch(self) -> int:
        if self.trainer is None:
            return 0
        # set on the Trainer by Lightning's data connector; not declared on the class
        reload_every = getattr(self.trainer, "reload_dataloaders_every_n_epochs", None)
        if reload_every != 1:
            rank_zero_warn(
                "SequenceDataModule draws fresh training data per epoch only when the Trainer has "
                "reload_dataloaders_every_n_epochs=1; with "
                f"{reload_every} epochs are reused."
            )
        return self.trainer.current_epoch
