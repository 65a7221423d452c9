"""Gradient clipping by the global norm (the norm itself is computed by the optimizer over its shard)."""
from __future__ import annotations

import torch


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The multiplier applied to the gradients: min(1, max_norm / norm); no clipping when max_norm <= 0."""
    if max_norm <= 0:
        return torch.ones_like(norm)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)
