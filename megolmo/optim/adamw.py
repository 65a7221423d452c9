"""AdamW over flat buffers, optionally sharded over data-parallel ranks (ZeRO-1, "distributed optimizer").

Each rank owns a shard of every bucket (the whole bucket without sharding). For its shard it keeps
fp32 master weights (a view of the parameters themselves when they are fp32) and the two Adam
moments, updates them, writes the parameters back in their compute dtype and, when sharded,
all-gathers the updated parameters. Per rank that is 6 + 12/DP bytes per parameter in bf16
(bf16 parameters, fp32 gradients; fp32 master, m and v sharded) instead of 18.

The update is element-wise, so sharding changes which rank computes an element, never its value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megolmo.optim.buffers import FlatBuffers
from megolmo.optim.clip import clip_factor
from megolmo.parallel.collectives import all_gather
from megolmo.parallel.mappings import Group, all_reduce_sum, group_rank, group_size


@dataclass(frozen=True)
class AdamWSettings:
    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad_norm: float = 1.0


def decays(name: str) -> bool:
    """OLMo 2 decays every weight except the embeddings."""
    return "embed_tokens" not in name


@dataclass(frozen=True)
class Segment:
    """A run of this rank's shard lying inside one parameter: the unit of weight decay and of the norm."""

    start: int
    end: int
    name: str
    param_offset: int  # where the segment starts inside the flattened parameter
    decay: bool
    counts_in_norm: bool


def complement(ranges: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The parts of ``[0, length)`` outside the sorted, disjoint ``ranges``."""
    gaps, cursor = [], 0
    for start, end in ranges:
        if cursor < start:
            gaps.append((cursor, start))
        cursor = end
    if cursor < length:
        gaps.append((cursor, length))
    return gaps


def merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join touching ranges, so weight decay is a few large multiplies, not one per parameter."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


class DistributedAdamW:
    """``fused_update`` (from ``megolmo/kernels/fused_adam.py``) replaces the reference element-wise maths
    with one fused kernel per shard and weight-decay group."""

    def __init__(self, buffers: FlatBuffers, settings: AdamWSettings, dp_group: Group, sharded: bool,
                 tp_rank: int, norm_groups: list[Group], fused_update: Callable | None = None):
        self.buffers = buffers
        self.settings = settings
        self.dp_group = dp_group
        self.sharded = sharded and group_size(dp_group) > 1
        self.norm_groups = list(norm_groups) + ([dp_group] if self.sharded else [])
        self.dp, self.dp_rank = group_size(dp_group), group_rank(dp_group)
        self.shards = [b.shard(self.dp_rank, self.dp) if self.sharded else (b.start, b.end) for b in buffers.buckets]
        self.segments = self._segments(tp_rank)
        self.decay_ranges = [merged_ranges([(s.start, s.end) for s in segs if s.decay]) for segs in self.segments]
        self.fused_update = fused_update
        fp32_params = buffers.params.dtype == torch.float32
        self.master = [buffers.params[s:e] if fp32_params else buffers.params[s:e].float() for s, e in self.shards]
        self.exp_avg = [torch.zeros_like(m) for m in self.master]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.master]
        self.step_count = 0
        self.owns_master_copy = not fp32_params

    def _segments(self, tp_rank: int) -> list[list[Segment]]:
        per_shard = []
        for start, end in self.shards:
            pieces = []
            for slot in self.buffers.slots:
                lo, hi = max(start, slot.start), min(end, slot.end)
                if lo < hi:
                    replicated = slot.param.shard_spec.dim is None
                    pieces.append(Segment(lo - start, hi - start, slot.name, lo - slot.start, decays(slot.name),
                                          not replicated or tp_rank == 0))
            per_shard.append(pieces)
        return per_shard

    def grad_shards(self) -> list[torch.Tensor]:
        return [self.buffers.grads[s:e] for s, e in self.shards]

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm: TP-replicated weights counted once, summed over TP, PP (and DP shards)."""
        grads = self.grad_shards()
        pieces = [grads[i][seg.start:seg.end] for i, segs in enumerate(self.segments) for seg in segs
                  if seg.counts_in_norm]
        total = torch.zeros((), dtype=torch.float32, device=self.buffers.grads.device)
        if pieces:
            total = torch.stack(torch._foreach_norm(pieces)).square().sum()
        for group in self.norm_groups:
            all_reduce_sum(total, group)
        return total.sqrt()

    @torch.no_grad()
    def step(self, lr: float, norm: torch.Tensor | None = None) -> float:
        """Clip, update this rank's shard, write parameters back (and all-gather them); returns the pre-clip norm
        (``norm``: already computed by the caller)."""
        norm = self.grad_norm() if norm is None else norm
        scale = clip_factor(norm, self.settings.clip_grad_norm)
        self.step_count += 1
        beta1, beta2 = self.settings.betas
        bias1 = 1 - beta1 ** self.step_count
        bias2 = 1 - beta2 ** self.step_count
        for i, grad in enumerate(self.grad_shards()):
            grad.mul_(scale)
            if self.fused_update is not None:
                self._fused_step(i, grad, lr)
                continue
            master, m, v = self.master[i], self.exp_avg[i], self.exp_avg_sq[i]
            if self.settings.weight_decay:
                for start, end in self.decay_ranges[i]:
                    master[start:end].mul_(1 - lr * self.settings.weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = v.sqrt().div_(bias2 ** 0.5).add_(self.settings.eps)
            master.addcdiv_(m, denom, value=-lr / bias1)
        self.write_back_parameters()
        return float(norm)

    def _fused_step(self, i: int, grad: torch.Tensor, lr: float) -> None:
        """One fused call for the decayed ranges of shard ``i`` and one for the rest (embeddings, padding)."""
        decayed = self.decay_ranges[i]
        for ranges, weight_decay in ((decayed, self.settings.weight_decay), (complement(decayed, grad.numel()), 0.0)):
            if ranges:
                shards = (self.master[i], grad, self.exp_avg[i], self.exp_avg_sq[i])
                views = [[t[s:e] for s, e in ranges] for t in shards]
                self.fused_update(*views, lr=lr, betas=self.settings.betas, eps=self.settings.eps,
                                  step=self.step_count, weight_decay=weight_decay)

    def write_back_parameters(self) -> None:
        """Copy the fp32 master shard into the compute-dtype parameters and, if sharded, all-gather them."""
        params = self.buffers.params
        if self.owns_master_copy:
            for (start, end), master in zip(self.shards, self.master):
                params[start:end].copy_(master)
        if self.sharded:
            for bucket, (start, end) in zip(self.buffers.buckets, self.shards):
                pieces = list(params[bucket.start: bucket.end].chunk(self.dp))
                all_gather(pieces, params[start:end].clone(), self.dp_group)

    def state_bytes(self) -> int:
        """Bytes this rank holds for the optimizer: moments, plus master weights when they are a copy."""
        tensors = self.exp_avg + self.exp_avg_sq + (self.master if self.owns_master_copy else [])
        return sum(t.numel() * t.element_size() for t in tensors)
