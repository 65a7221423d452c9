"""Data-parallel gradient reduction: once per optimizer step, bucket by bucket, overlapped with backward.

Each parameter's post-accumulate hook counts its gradients; when a parameter has received one per
micro-batch its gradient is final, and when every parameter of a bucket is final the bucket's
reduction is launched asynchronously while backward goes on. This works for any schedule (plain,
1F1B, interleaved) without being told which micro-batch is the last. Reductions are sums in fp32:
each rank's loss is already divided by the global token count.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from megolmo.optim.buffers import Bucket, FlatBuffers
from megolmo.parallel.collectives import all_reduce, reduce_scatter
from megolmo.parallel.mappings import Group, group_rank, group_size


class GradientSynchronizer:
    def __init__(self, buffers: FlatBuffers, dp_group: Group, num_micro_batches: int, reduce_scatter: bool,
                 overlap: bool = True):
        self.buffers = buffers
        self.group = dp_group
        self.dp = group_size(dp_group)
        self.dp_rank = group_rank(dp_group)
        self.num_micro_batches = num_micro_batches
        self.reduce_scatter = reduce_scatter
        self.overlap = overlap
        self.bucket_of = buffers.bucket_of()
        self.events: list[tuple[str, int, float]] = []  # ("grad_ready" | "launch", bucket, time)
        self._pending: list[tuple[Bucket, dist.Work | None, torch.Tensor | None]] = []
        self._counts: dict[int, int] = {}
        self._ready: dict[int, int] = {}
        for slot in buffers.slots:
            slot.param.register_post_accumulate_grad_hook(self.count_gradient)

    def start_step(self) -> None:
        self.buffers.reset_grads()
        self.events = []
        self._counts = {id(s.param): 0 for s in self.buffers.slots}
        self._ready = {b.index: 0 for b in self.buffers.buckets}

    def gradient_count(self, param: nn.Parameter) -> int:
        """Micro-batch gradients ``param`` has received this step."""
        return self._counts[id(param)]

    def count_gradient(self, param: nn.Parameter) -> None:
        """One more micro-batch's gradient has been accumulated into ``param``: autograd's accumulate
        hook calls this, and so does a pipeline schedule's separate weight pass, which accumulates
        without the hook."""
        if param.grad is not None and param.grad.data_ptr() != param.main_grad.data_ptr():
            param.main_grad.add_(param.grad)  # low-precision parameter: accumulate in fp32, drop the grad
            param.grad = None
        key = id(param)
        self._counts[key] += 1
        if self._counts[key] < self.num_micro_batches:
            return
        bucket = self.bucket_of[key]
        self._ready[bucket.index] += 1
        self.events.append(("grad_ready", bucket.index, time.perf_counter()))
        if self.overlap and self._ready[bucket.index] == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        self.events.append(("launch", bucket.index, time.perf_counter()))
        if self.dp == 1:
            self._pending.append((bucket, None, None))
            return
        data = self.buffers.grads[bucket.start: bucket.end]
        if self.reduce_scatter:
            out = torch.empty(bucket.size // self.dp, dtype=data.dtype, device=data.device)
            work = reduce_scatter(out, data.chunk(self.dp), self.group, async_op=True)
            self._pending.append((bucket, work, out))
        else:
            self._pending.append((bucket, all_reduce(data, self.group, async_op=True), None))

    def finish(self) -> None:
        """Launch what is left (all buckets when overlap is off) and wait for every reduction."""
        launched = {bucket.index for bucket, _, _ in self._pending}
        for bucket in self.buffers.buckets:
            if bucket.index not in launched:
                self._launch(bucket)
        for bucket, work, out in self._pending:
            if work is not None:
                work.wait()
            if out is not None:
                start, end = bucket.shard(self.dp_rank, self.dp)
                self.buffers.grads[start:end].copy_(out)
        self._pending = []
        self.events.append(("finished", -1, time.perf_counter()))
