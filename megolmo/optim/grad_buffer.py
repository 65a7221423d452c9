"""Gradients accumulated across micro-batches into one contiguous fp32 buffer.

Each parameter gets a ``main_grad`` view into the buffer. fp32 parameters use that view as their
``.grad``, so autograd accumulates in place; low-precision parameters add their gradient into it
from a post-accumulate hook and drop it, so micro-batch sums happen in fp32. One flat buffer makes
zeroing, the norm and (later) bucketed data-parallel reductions single operations.
"""
from __future__ import annotations

import torch
from torch import nn


class GradBuffer:
    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype = torch.float32):
        self.params = params
        total = sum(p.numel() for p in params)
        device = params[0].device if params else torch.device("cpu")
        self.data = torch.zeros(total, dtype=dtype, device=device)
        self.offsets: list[tuple[int, int]] = []
        offset = 0
        for p in params:
            view = self.data[offset: offset + p.numel()].view_as(p)
            p.main_grad = view
            self.offsets.append((offset, offset + p.numel()))
            offset += p.numel()
            if p.dtype == dtype:
                p.grad = view
            else:
                p.register_post_accumulate_grad_hook(_accumulate_into_main_grad)

    def zero(self) -> None:
        self.data.zero_()
        for p in self.params:
            if p.dtype == self.data.dtype:
                p.grad = p.main_grad

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _accumulate_into_main_grad(param: nn.Parameter) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None
