"""RMSNorm as OLMo 2 uses it: statistics and the weight multiply in fp32, result cast back.

``stat_group`` makes the mean of squares span a tensor split across ranks: OLMo 2's QK-norm
normalises the full q/k projection width, so under TP each rank reduces its partial sum of squares.
"""
from __future__ import annotations

import torch
from torch import nn

from megolmo.parallel.layers import ShardSpec, attach_spec
from megolmo.parallel.mappings import Group, all_reduce_sum, group_size


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce sum forward and backward: every rank's partial statistic feeds every rank's output,
    so the gradient of a rank's partial sum is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return all_reduce_sum(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_sum(grad.clone(), ctx.group), None


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float, global_width: int | None = None, stat_group: Group = None,
                 spec: ShardSpec | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.eps = eps
        self.global_width = global_width or width
        self.stat_group = stat_group
        self.weight = attach_spec(nn.Parameter(torch.ones(width, device=device)),
                                  spec or ShardSpec((width,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if group_size(self.stat_group) == 1:
            variance = x32.pow(2).mean(-1, keepdim=True)
        else:
            sum_sq = _SumAcrossRanks.apply(x32.pow(2).sum(-1, keepdim=True), self.stat_group)
            variance = sum_sq / self.global_width
        return (self.weight.float() * (x32 * torch.rsqrt(variance + self.eps))).to(x.dtype)
