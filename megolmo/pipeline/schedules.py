"""The order of forward and backward passes on one pipeline rank.

An op is ``("F" | "B", micro_batch, virtual_chunk)``. 1F1B: ``P - rank - 1`` warm-up forwards, then
alternate one forward and one backward, then the remaining backwards. Interleaved (Megatron's): the
same shape over ``M x V`` passes, where forwards walk the rank's chunks in groups of ``P``
micro-batches and backwards walk them in reverse, with ``(P - rank - 1) x 2 + (V - 1) x P`` warm-up
forwards.
"""
from __future__ import annotations

Op = tuple[str, int, int]


def _forward_position(k: int, pipeline: int, virtual: int) -> tuple[int, int]:
    """(micro_batch, chunk) of the k-th forward on a rank."""
    group, within = divmod(k, pipeline * virtual)
    return group * pipeline + within % pipeline, within // pipeline


def _backward_position(k: int, pipeline: int, virtual: int) -> tuple[int, int]:
    micro_batch, chunk = _forward_position(k, pipeline, virtual)
    return micro_batch, virtual - 1 - chunk


def warmup_forwards(pipeline: int, rank: int, micro_batches: int, virtual: int) -> int:
    total = micro_batches * virtual
    if virtual == 1:
        return min(pipeline - rank - 1, total)
    return min((pipeline - rank - 1) * 2 + (virtual - 1) * pipeline, total)


def pipeline_order(pipeline: int, rank: int, micro_batches: int, virtual: int = 1) -> list[Op]:
    total = micro_batches * virtual
    warmup = warmup_forwards(pipeline, rank, micro_batches, virtual)
    order: list[Op] = []
    for k in range(warmup):
        order.append(("F", *_forward_position(k, pipeline, virtual)))
    for i in range(total - warmup):
        order.append(("F", *_forward_position(warmup + i, pipeline, virtual)))
        order.append(("B", *_backward_position(i, pipeline, virtual)))
    for i in range(total - warmup, total):
        order.append(("B", *_backward_position(i, pipeline, virtual)))
    return order
