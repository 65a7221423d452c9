"""The one door to torch.distributed for code outside ``megolmo/parallel/``.

An NCCL group accepts only tensors on the current CUDA device and gloo only CPU tensors; a tensor on the
wrong device fails at run time, often only on a multi-GPU job. So bookkeeping values (sums, maxima of a
few numbers) are passed as floats and placed on the group's device here, and tensor-level collectives
check their tensors' device before anything is sent (``tests/test_collectives.py`` enforces the door).

As in ``mappings``, ``group=None`` means a single rank: no collective runs, and the result is what the
one rank already has. ``src`` and ``dst`` are global ranks, as in torch.distributed. Pipeline
point-to-point traffic is torch.distributed.pipelining's own (``megolmo/pipeline/`` sends nothing itself).
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.distributed as dist

from megolmo.parallel.mappings import Group, group_size, outside_compiled_graphs

Op = Literal["sum", "max"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def world_group() -> Group:
    """All ranks, or None (one rank) when torch.distributed is not initialized."""
    return dist.group.WORLD if dist.is_initialized() else None


def device_for_backend(backend: str, current_cuda_index: int | None) -> torch.device:
    """The device whose tensors a backend's collectives take: NCCL the current CUDA device, gloo the CPU."""
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        if current_cuda_index is None:
            raise ValueError("an NCCL process group needs a current CUDA device, and CUDA is not available")
        return torch.device("cuda", current_cuda_index)
    raise ValueError(f"no device rule for process-group backend {backend!r} (megolmo uses nccl or gloo)")


def group_device(group: Group) -> torch.device:
    """The device of ``group``'s collectives; the CPU for a single rank, where none runs."""
    if group_size(group) == 1:
        return torch.device("cpu")
    cuda_index = torch.cuda.current_device() if torch.cuda.is_available() else None
    return device_for_backend(str(dist.get_backend(group)), cuda_index)


def _check_device(tensor: torch.Tensor, device: torch.device) -> None:
    """Refuse a tensor on another device: copying it would break the in-place result the caller reads."""
    if tensor.device != device:
        raise ValueError(f"collective on a tensor on {tensor.device}, but this process group communicates "
                         f"on {device}: create the tensor on {device}")


def all_reduce_values(values: Sequence[float], op: Op, group: Group) -> list[float]:
    """Sum or max of a few numbers across the group (float64: exact for integers below 2**53)."""
    if group_size(group) == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=group_device(group))
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor.tolist()


# Tensor-level collectives are kept out of torch.compile's graphs, as in ``mappings``.
@outside_compiled_graphs
def all_reduce(tensor: torch.Tensor, group: Group, op: Op = "sum", async_op: bool = False) -> dist.Work | None:
    """In-place reduction of ``tensor``; with ``async_op`` the pending work (None for a single rank)."""
    if group_size(group) == 1:
        return None
    _check_device(tensor, group_device(group))
    return dist.all_reduce(tensor, op=_OPS[op], group=group, async_op=async_op)


@outside_compiled_graphs
def reduce_scatter(out: torch.Tensor, pieces: Sequence[torch.Tensor], group: Group, op: Op = "sum",
                   async_op: bool = False) -> dist.Work | None:
    """``out`` = this rank's piece reduced over the group (one piece per rank, in rank order)."""
    if group_size(group) == 1:
        out.copy_(pieces[0])
        return None
    device = group_device(group)
    for tensor in (out, *pieces):
        _check_device(tensor, device)
    return dist.reduce_scatter(out, list(pieces), op=_OPS[op], group=group, async_op=async_op)


@outside_compiled_graphs
def all_gather(pieces: Sequence[torch.Tensor], tensor: torch.Tensor, group: Group) -> None:
    """Fill ``pieces[r]`` with rank r's ``tensor``."""
    if group_size(group) == 1:
        pieces[0].copy_(tensor)
        return
    device = group_device(group)
    for t in (tensor, *pieces):
        _check_device(t, device)
    dist.all_gather(list(pieces), tensor, group=group)


def all_gather_objects(obj: Any, group: Group) -> list[Any]:
    """Every rank's picklable ``obj``, in group rank order."""
    if group_size(group) == 1:
        return [obj]
    gathered: list[Any] = [None] * group_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def gather_objects(obj: Any, dst: int, group: Group) -> list[Any] | None:
    """Every rank's ``obj`` on global rank ``dst`` (in group rank order); None on the other ranks."""
    if group_size(group) == 1:
        return [obj]
    gathered = [None] * group_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst, group=group)
    return gathered


def broadcast_object(obj: Any, src: int, group: Group) -> Any:
    """Global rank ``src``'s ``obj`` on every rank."""
    if group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: Group) -> None:
    if group_size(group) > 1:
        dist.barrier(group=group)
