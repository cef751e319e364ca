"""What a run does about memory and CPU processes before training: the warning over ``budget_gb`` (one line with
the estimate and the fix, from the command line too), ``shrink_batch_to_gb`` (``debug=fast``: 4 GB) halving the
batch until the estimate fits, glibc's mmap threshold, and ``trainer.devices`` > cores on a CPU refused."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.helpers import run_module, run_train, tiny_sequence_overrides
from tiny_decoder.core.errors import ConfigError
from tiny_decoder.model import ModelConfig
from tiny_decoder.run.build import set_mmap_threshold
from tiny_decoder.run.config_checks import build_model_config, check_cpu_processes, validate_config
from tiny_decoder.run.memory import (
    FRAMEWORK_BYTES,
    GIB,
    TEXT_DATA_BYTES,
    check_budget,
    estimate_run,
    framework_bytes_of,
    shrink_batch,
)


def model_of(cfg) -> ModelConfig:
    """The recipe's model, vocabulary and context from its data module (what training builds)."""
    return ModelConfig.from_dict(build_model_config(cfg, instantiate(cfg.data, _convert_="all")))


def test_over_budget_is_one_warning_line_with_the_estimate_and_the_fix(compose_config, caplog):
    cfg = compose_config("+experiment=sequence_strong", "budget_gb=0.0001")
    with caplog.at_level(logging.WARNING, logger="tiny_decoder.run.memory"):
        estimate = check_budget(cfg, model_of(cfg))
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert f"estimated peak memory {estimate.total_gib:.1f} GiB (batch 64, 32-true) exceeds budget_gb=0.0001" in message
    assert "reduce data.batch_size, use precision=bf16-mixed, or shorten data.context_length" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tiny_decoder.run.memory"):
        check_budget(compose_config("+experiment=sequence_strong", "budget_gb=8"), model_of(cfg))
    assert not caplog.records


def test_budget_gb_from_the_command_line_warns_before_training(tmp_path, monkeypatch, capsys):
    overrides = ["+experiment=sequence_seed", *tiny_sequence_overrides(epochs=1), "debug=fast", "budget_gb=0.01"]
    assert run_train(monkeypatch, *overrides, f"hydra.run.dir={tmp_path}") == 0
    printed = capsys.readouterr()
    warnings = [line for line in (printed.out + printed.err).splitlines() if "exceeds budget_gb=0.01" in line]
    assert len(warnings) == 1 and "estimated peak memory 0.5 GiB (batch 32, 32-true)" in warnings[0]


def test_the_framework_is_counted_on_a_cpu_and_more_for_text_data(compose_config):
    sequence = compose_config("+experiment=sequence_seed", "trainer.accelerator=cpu")
    text = compose_config("+experiment=stories_tiny", "trainer.accelerator=cpu")
    assert framework_bytes_of(sequence) == FRAMEWORK_BYTES
    assert framework_bytes_of(text) == FRAMEWORK_BYTES + TEXT_DATA_BYTES
    estimate = estimate_run(sequence, model_of(sequence))
    assert estimate.total_bytes == estimate.step_bytes + FRAMEWORK_BYTES


def test_debug_fast_shrinks_a_batch_that_needs_more_than_4_gib(compose_config, caplog):
    """stories15m at its batch 128 (fp32): ~7 GiB estimated; debug=fast halves the batch until it fits 4 GB."""
    cfg = compose_config("+experiment=stories15m", "debug=fast", "trainer.accelerator=cpu")
    assert cfg.shrink_batch_to_gb == 3.7  # GiB: 4 GB
    limit, config = 3.7 * GIB, model_of(cfg)
    assert estimate_run(cfg, config).total_bytes > limit
    with caplog.at_level(logging.WARNING, logger="tiny_decoder.run.memory"):
        size = shrink_batch(cfg, config)
    assert cfg.data.batch_size == size and size < 128 and 128 % size == 0
    assert size == 32 and estimate_run(cfg, config).total_bytes <= limit
    cfg.data.batch_size = 2 * size
    assert estimate_run(cfg, config).total_bytes > limit  # the largest halving that fits
    (record,) = caplog.records
    assert f"data.batch_size 128 -> {size} so that one step fits shrink_batch_to_gb=3.7" in record.getMessage()
    assert "shrink_batch_to_gb=null keeps the recipe's batch" in record.getMessage()
    untouched = compose_config("+experiment=stories260k", "debug=fast", "trainer.accelerator=cpu")
    assert shrink_batch(untouched, model_of(untouched)) == 128  # fits: left alone
    assert shrink_batch(compose_config("+experiment=stories15m"), config) == 128  # not debug=fast: null


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("budget_gb", -1, "budget_gb must be a positive number of GiB (or null: available RAM / GPU memory)"),
        ("shrink_batch_to_gb", 0, "shrink_batch_to_gb must be a positive number of GiB"),
        ("malloc_mmap_threshold_mb", -2, "malloc_mmap_threshold_mb must be a positive number of MiB"),
        ("allow_cpu_oversubscription", "yes", "allow_cpu_oversubscription must be true or false"),
    ],
)
def test_memory_fields_are_range_checked(compose_config, field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(compose_config("+experiment=sequence_seed", f"{field}={value}"))


def test_the_mmap_threshold_is_set_on_linux():
    assert set_mmap_threshold(None) is False
    maps = Path("/proc/self/maps")
    if maps.exists() and "libc.so.6" in maps.read_text():  # Linux with glibc
        assert set_mmap_threshold(1) is True


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["trainer.devices=4"], True),
        (["trainer.devices=2"], False),
        (["trainer.devices=2", "torch_threads=2"], True),  # 2 processes x 2 threads on 2 cores
        (["trainer.devices=4", "allow_cpu_oversubscription=true"], False),
        (["trainer.devices=auto"], False),
    ],
)
def test_more_cpu_processes_than_cores_is_refused(compose_config, overrides, refused):
    cfg = compose_config("+experiment=sequence_seed", "trainer=ddp", "trainer.accelerator=cpu", *overrides)
    if not refused:
        check_cpu_processes(cfg, cores=2)
        return
    with pytest.raises(ConfigError) as error:
        check_cpu_processes(cfg, cores=2)
    message = str(error.value)
    assert "CPU training processes" in message and "on this machine's 2 cores" in message
    assert "use trainer=cpu (one process) or trainer.devices<=" in message and "allow_cpu_oversubscription" in message


def expected_ddp_error(devices: int) -> str:
    cores = os.cpu_count()
    return (
        f"error: trainer.devices={devices} starts {devices} CPU training processes (no GPU found) on this machine's "
        f"{cores} cores: use trainer=cpu (one process) or trainer.devices<={cores}, or "
        "allow_cpu_oversubscription=true to start them anyway"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without GPUs")
def test_ddp_on_a_cpu_with_more_devices_than_cores_is_one_error_line_before_anything_starts(monkeypatch, capsys):
    """The train tool's real entry point, in this process (the same command as a process: the slow test below)."""
    devices = max(4, (os.cpu_count() or 1) + 1)
    args = ["+experiment=sequence_seed", "trainer=ddp", f"trainer.devices={devices}", "debug=fast"]
    assert run_train(monkeypatch, *args) == 2
    errors = capsys.readouterr().err
    assert [line for line in errors.splitlines() if line.startswith("error:")] == [expected_ddp_error(devices)]
    assert "Traceback" not in errors


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without GPUs")
def test_ddp_on_a_cpu_with_more_devices_than_cores_is_one_error_line():
    """``trainer=ddp trainer.devices=4`` (more if this machine has 4 cores or more) with no GPU, as a user runs it."""
    devices = max(4, (os.cpu_count() or 1) + 1)
    result = run_module(
        "tiny_decoder.train", "+experiment=sequence_seed", "trainer=ddp", f"trainer.devices={devices}", "debug=fast"
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [expected_ddp_error(devices)], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
