"""Building a run: ``compile_options`` turns into torch.compile keyword arguments (null, or null entries, are torch's
defaults)."""

from __future__ import annotations

from omegaconf import OmegaConf

from tiny_decoder.run.build import compile_options


def test_compile_options_null_or_null_entries_are_torch_defaults():
    assert compile_options(OmegaConf.create({"compile_options": None})) == {}
    assert compile_options(OmegaConf.create({})) == {}
    node = {"compile_options": {"mode": None, "dynamic": False, "fullgraph": True}}
    assert compile_options(OmegaConf.create(node)) == {"dynamic": False, "fullgraph": True}
