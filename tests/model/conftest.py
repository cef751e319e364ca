"""Shared fixtures for the model tests: tiny float64 configs and models, seeded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tiny_decoder.model import DecoderTransformer, ModelConfig

TINY = dict(vocab_size=11, context_length=12, d_model=8, n_layers=2, n_heads=2, d_ff=16)


def tiny_config(**overrides: Any) -> ModelConfig:
    """A 2-layer, 2-head, d_model=8 config over 11 tokens and 12 positions (overrides win)."""
    return ModelConfig(**{**TINY, **overrides})


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    """``make_config(**overrides)``: :func:`tiny_config`."""
    return tiny_config


@pytest.fixture
def build() -> Callable[..., DecoderTransformer]:
    """``build(**overrides)``: a seeded float64 model in eval mode."""

    def make(**overrides: Any) -> DecoderTransformer:
        torch.manual_seed(1234)
        return DecoderTransformer(tiny_config(**overrides)).double().eval()

    return make
