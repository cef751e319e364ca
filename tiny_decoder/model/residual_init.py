"""GPT-2's scaled init: the Linear layers that write into the residual stream (attention's output projection,
the feed-forward's down projection) are marked, and the model's init draws their weights with std scaled by
``1/sqrt(2 * n_layers)``."""

from __future__ import annotations

from torch import nn

_MARK = "is_residual_projection"


def mark_residual_projection(linear: nn.Linear) -> nn.Linear:
    """Flag ``linear`` as a residual projection (a plain attribute: ``nn.Module.__setattr__`` is typed for
    tensors and modules only)."""
    setattr(linear, _MARK, True)
    return linear


def is_residual_projection(module: nn.Module) -> bool:
    return bool(getattr(module, _MARK, False))
