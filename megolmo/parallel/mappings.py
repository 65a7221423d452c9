"""Autograd-aware collectives for tensor and sequence parallelism (Megatron's four mappings).

Each function is a no-op when the group is None or has one rank, so single-process code runs
the same path without a process group. Activations are batch-first: ``[batch, seq, hidden]``;
sequence-parallel shards split dim 1.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None
_BOUNDARIES: list[tuple[Callable[..., Any], list[Callable[..., Any]]]] = []


def outside_compiled_graphs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)`` once ``prepare_for_compile`` has run: the decorator itself imports
    ``torch._dynamo`` (about 2 s per process), which a job that never compiles should not pay at start-up."""
    target = [fn]
    _BOUNDARIES.append((fn, target))

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return target[0](*args, **kwargs)
    return call


def prepare_for_compile() -> None:
    """Before the first ``torch.compile``: every collective becomes a clean graph break."""
    for fn, target in _BOUNDARIES:
        if target[0] is fn:
            target[0] = torch.compiler.disable(fn)


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """In-place sum across the group (no autograd)."""
    if group_size(group) > 1:
        _all_reduce_in_place(tensor, group)
    return tensor


# The collectives themselves are kept out of torch.compile's graphs (``trainer.compile``): a compiled
# block breaks its graph cleanly at each TP collective, and single-rank blocks, which never reach
# them, compile whole.
@outside_compiled_graphs
def _all_reduce_in_place(tensor: torch.Tensor, group: Group) -> None:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


@outside_compiled_graphs
def _all_gather_dim(tensor: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=dim)


@outside_compiled_graphs
def _reduce_scatter_dim(tensor: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    parts = [p.contiguous() for p in tensor.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=group)
    return out


def _split_dim(tensor: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    return tensor.chunk(size, dim=dim)[group_rank(group)].contiguous()


class _CopyToParallel(torch.autograd.Function):
    """Identity forward, all-reduce backward: the input of a column-parallel layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_sum(grad.contiguous(), ctx.group), None


class _ReduceFromParallel(torch.autograd.Function):
    """All-reduce forward, identity backward: the output of a row-parallel layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return all_reduce_sum(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather along the sequence forward, reduce-scatter backward: entering a TP region under SP."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_gather_dim(x, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_dim(grad, 1, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Reduce-scatter along the sequence forward, all-gather backward: leaving a TP region under SP."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_dim(x, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_dim(grad, 1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """Split along the sequence forward, all-gather backward: a replicated tensor entering SP.
    (The vocab-parallel embedding does not need it: it reduce-scatters its partial sums directly.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _split_dim(x, 1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_dim(grad, 1, ctx.group), None


def copy_to_tensor_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromParallel.apply(x, group)


def gather_from_sequence_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)


def scatter_to_sequence_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)
