"""``trainer=ddp`` on CPU: 2 processes (gloo) launched by Lightning from the Hydra command line; each rank trains on
its own shard of the data and both end with identical weights; ``trainer=fsdp`` builds its strategy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from hydra.utils import instantiate

from tests.helpers import run_module, tiny_sequence_overrides


class RecordRank(L.Callback):
    """Test helper: writes ``<dirpath>/rank<r>.json`` with a digest of every training batch this rank saw and
    a digest of its final weights."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.batches: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self.batches.append(hashlib.sha256(batch["input"].numpy().tobytes()).hexdigest())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        record = {"world_size": trainer.world_size, "batches": self.batches, "weights": digest.hexdigest()}
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_shards_data_and_keeps_weights_identical(tmp_path: Path):
    result = run_module(
        "tiny_decoder.train",
        "+experiment=sequence_strong",
        *tiny_sequence_overrides(epochs=2),
        "~callbacks.attention_maps",
        "model.d_model=32",
        "model.n_layers=1",
        "model.d_ff=64",
        "data.batch_size=32",
        "test=false",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "+callbacks.record._target_=tests.test_ddp.RecordRank",
        "+callbacks.record.dirpath=${paths.output_dir}/ranks",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 2 * 640 // 32 // 2  # each rank: half the data
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])  # different data on each rank
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients all-reduced: identical weights
    results = json.loads((tmp_path / "results.json").read_text())  # written once, by rank 0
    assert results["global_step"] == 20
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_fsdp_config_builds_a_sharded_strategy_wrapping_each_block(compose_config):
    from lightning.pytorch.strategies import FSDPStrategy

    from tiny_decoder.model.transformer import Block

    cfg = compose_config("+experiment=stories_tiny", "trainer=fsdp")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}  # a ModuleWrapPolicy
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "full"


def test_ddp_config_composes(compose_config):
    cfg = compose_config("+experiment=sequence_strong", "trainer=ddp", "trainer.devices=2")
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy") and cfg.trainer.use_distributed_sampler
