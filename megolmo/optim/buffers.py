"""Model parameters and their fp32 gradients laid out in two flat buffers, cut into buckets.

Parameters are placed in reverse order of registration, which is roughly the order in which backward
produces their gradients, so the first buckets are ready first. Every bucket is padded to a multiple
of the data-parallel size so that it splits into equal per-rank shards (reduce-scatter and all-gather
need equal pieces). Each parameter becomes a view into the parameter buffer, and its ``main_grad`` a
view into the gradient buffer: zeroing, norms, reductions and optimizer updates are then a few large
operations instead of one per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Bucket:
    index: int
    start: int
    end: int
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start

    def shard(self, rank: int, world: int) -> tuple[int, int]:
        """The flat range of this bucket owned by data-parallel ``rank``."""
        step = self.size // world
        return self.start + rank * step, self.start + (rank + 1) * step


@dataclass(frozen=True)
class ParamSlot:
    name: str
    param: nn.Parameter
    start: int
    end: int


class FlatBuffers:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], dp_size: int, bucket_size: int,
                 grad_dtype: torch.dtype = torch.float32):
        if not named_params:
            raise ValueError("no parameters to optimize")
        device, param_dtype = named_params[0][1].device, named_params[0][1].dtype
        self.slots: list[ParamSlot] = []
        self.buckets: list[Bucket] = []
        offset, bucket_start, bucket_params = 0, 0, []
        for name, param in reversed(named_params):
            self.slots.append(ParamSlot(name, param, offset, offset + param.numel()))
            bucket_params.append(param)
            offset += param.numel()
            if offset - bucket_start >= bucket_size:
                offset = self._close_bucket(bucket_start, offset, bucket_params, dp_size)
                bucket_start, bucket_params = offset, []
        if bucket_params:
            offset = self._close_bucket(bucket_start, offset, bucket_params, dp_size)
        self.numel = offset
        self.params = torch.zeros(offset, dtype=param_dtype, device=device)
        self.grads = torch.zeros(offset, dtype=grad_dtype, device=device)
        for slot in self.slots:
            view = self.params[slot.start: slot.end].view_as(slot.param)
            view.copy_(slot.param.detach())
            slot.param.data = view
            slot.param.main_grad = self.grads[slot.start: slot.end].view_as(slot.param)
        self.reset_grads()

    def _close_bucket(self, start: int, end: int, params: list[nn.Parameter], dp_size: int) -> int:
        padded_end = start + -(-(end - start) // dp_size) * dp_size
        self.buckets.append(Bucket(len(self.buckets), start, padded_end, list(params)))
        return padded_end

    def reset_grads(self) -> None:
        """Zero the gradient buffer; fp32 parameters accumulate straight into it through ``.grad``."""
        self.grads.zero_()
        for slot in self.slots:
            if slot.param.dtype == self.grads.dtype:
                slot.param.grad = slot.param.main_grad

    def bucket_of(self) -> dict[int, Bucket]:
        """Map ``id(param)`` to its bucket."""
        return {id(p): bucket for bucket in self.buckets for p in bucket.params}

    @property
    def param_bytes(self) -> int:
        return self.params.numel() * self.params.element_size()

    @property
    def grad_bytes(self) -> int:
        return self.grads.numel() * self.grads.element_size()
