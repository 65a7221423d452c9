"""The global gradient norm, as one process would compute it, and clipping by it.

Tensors sharded across TP ranks contribute from every rank; tensors replicated across the TP group
contribute from TP rank 0 only, then the squares are summed over TP and pipeline ranks (and data
ranks when the optimizer is sharded over them).
"""
from __future__ import annotations

import torch
from torch import nn

from megolmo.parallel.mappings import Group, all_reduce_sum


def global_grad_norm(params: list[nn.Parameter], tp_rank: int, groups: list[Group]) -> torch.Tensor:
    device = params[0].main_grad.device if params else torch.device("cpu")
    sharded = [p.main_grad for p in params if p.shard_spec.dim is not None or tp_rank == 0]
    total = torch.zeros((), dtype=torch.float32, device=device)
    if sharded:
        norms = torch._foreach_norm(sharded)
        total = torch.stack([n.float() for n in norms]).square().sum()
    for group in groups:
        all_reduce_sum(total, group)
    return total.sqrt()


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The multiplier applied to the gradients: min(1, max_norm / norm); no clipping when max_norm <= 0."""
    if max_norm <= 0:
        return torch.ones_like(norm)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)
