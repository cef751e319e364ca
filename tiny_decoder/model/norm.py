"""Normalisation layers (LayerNorm, RMSNorm) and where they sit around each residual branch.

``norm.kind`` picks the layer, ``norm.placement`` the wiring: ``post`` (original Transformer,
``norm(x + f(x))``), ``pre`` (GPT-2, ``x + f(norm(x))`` plus a final norm before the head) or ``none``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from tiny_decoder.core.registry import Registry

Sublayer = Callable[[torch.Tensor], torch.Tensor]


class Placement(Protocol):
    """A residual wiring ``(x, sublayer, norm) -> output``, and which norms it needs."""

    uses_norm: bool  # each residual branch has a norm layer
    final_norm: bool  # the stack ends with a final norm before the head

    def __call__(self, x: torch.Tensor, sublayer: Sublayer, norm: nn.Module) -> torch.Tensor: ...


NORMS = Registry("model.norm.kind", group="norm.kind")
PLACEMENTS: Registry[type[Placement]] = Registry("model.norm.placement", group="norm")


@NORMS.register("layernorm")
def layer_norm(d_model: int, eps: float, affine: bool) -> nn.Module:
    return nn.LayerNorm(d_model, eps=eps, elementwise_affine=affine, bias=affine)


@NORMS.register("rmsnorm")
def rms_norm(d_model: int, eps: float, affine: bool) -> nn.Module:
    return nn.RMSNorm(d_model, eps=eps, elementwise_affine=affine)


@PLACEMENTS.register("pre")
class PreNorm:
    """``x + f(norm(x))``; the stack ends with a final norm."""

    uses_norm = True
    final_norm = True

    def __call__(self, x: torch.Tensor, sublayer: Sublayer, norm: nn.Module) -> torch.Tensor:
        return x + sublayer(norm(x))


@PLACEMENTS.register("post")
class PostNorm:
    """``norm(x + f(x))`` (Vaswani et al. 2017); needs learning-rate warmup."""

    uses_norm = True
    final_norm = False

    def __call__(self, x: torch.Tensor, sublayer: Sublayer, norm: nn.Module) -> torch.Tensor:
        return norm(x + sublayer(x))


@PLACEMENTS.register("none")
class NoNorm:
    """Plain residuals ``x + f(x)`` with no normalisation at all."""

    uses_norm = False
    final_norm = False

    def __call__(self, x: torch.Tensor, sublayer: Sublayer, norm: nn.Module) -> torch.Tensor:
        return x + sublayer(x)


def build_norm(norm_config: dict, d_model: int) -> nn.Module:
    """The configured normalisation layer, or Identity when the placement uses none."""
    if not PLACEMENTS.get(norm_config["placement"]).uses_norm:
        return nn.Identity()
    kind = norm_config.get("kind", "layernorm")
    return NORMS.build(kind, d_model, float(norm_config.get("eps", 1e-5)), bool(norm_config.get("affine", True)))
