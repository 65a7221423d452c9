"""RMSNorm as OLMo 2 uses it: statistics and the weight multiply in fp32, result cast back.

``stat_group`` makes the mean of squares span a tensor split across ranks: OLMo 2's QK-norm
normalises the full q/k projection width, so under TP each rank reduces its partial sum of squares.
"""
from __future__ import annotations

import torch
from torch import nn

from megolmo.parallel.layers import ShardSpec, attach_spec
from megolmo.parallel.mappings import Group, all_reduce_sum


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward that keeps only the input (in its own dtype) and the fp32
    ``1/rms`` per row: autograd through the fp32 formula would keep three fp32 copies of the row.

    With ``y = w * x * r`` and ``r = (sum(x^2) / G + eps)^-1/2`` over the global width G:
    ``dx = r * (g*w - (x*r) * sum(g*w * x*r) / G)`` and ``dw = sum over rows of g * x*r``. Both sums
    over the width are all-reduced across ``group`` when the row is split over TP ranks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, global_width: int, group: Group):
        x32 = x.float()
        sum_sq = all_reduce_sum(x32.square().sum(-1, keepdim=True), group)
        rstd = torch.rsqrt(sum_sq / global_width + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.global_width, ctx.group = global_width, group
        return (weight.float() * (x32 * rstd)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad32 = grad.float()
        scaled = grad32 * weight.float()
        dot = all_reduce_sum((scaled * normed).sum(-1, keepdim=True), ctx.group)
        grad_x = rstd * (scaled - normed * (dot / ctx.global_width))
        grad_weight = (grad32 * normed).reshape(-1, normed.shape[-1]).sum(0)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None, None, None


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
        return _RMSNormFunction.apply(x, self.weight, self.eps, self.global_width, self.stat_group)
