"""Point-to-point exchange between neighbouring pipeline ranks.

Sends are asynchronous and kept until complete (their buffers are then released); receives block.
Every message is tagged by (kind, receiving chunk, micro-batch), so activations and gradients that
travel between the same two ranks (interleaved schedules) can never be confused.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

ACTIVATION, GRADIENT = 0, 1


def message_tag(kind: int, chunk: int, micro_batch: int, num_chunks: int, num_micro_batches: int) -> int:
    return (kind * num_chunks + chunk) * num_micro_batches + micro_batch


class PointToPoint:
    def __init__(self, prev_rank: int, next_rank: int, num_chunks: int, num_micro_batches: int):
        self.prev_rank = prev_rank
        self.next_rank = next_rank
        self.num_chunks = num_chunks
        self.num_micro_batches = num_micro_batches
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def _tag(self, kind: int, chunk: int, micro_batch: int) -> int:
        return message_tag(kind, chunk, micro_batch, self.num_chunks, self.num_micro_batches)

    def send(self, tensor: torch.Tensor, kind: int, to_chunk: int, micro_batch: int) -> None:
        peer = self.next_rank if kind == ACTIVATION else self.prev_rank
        tensor = tensor.detach().contiguous()
        op = dist.P2POp(dist.isend, tensor, peer, tag=self._tag(kind, to_chunk, micro_batch))
        self.pending.extend((work, tensor) for work in dist.batch_isend_irecv([op]))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, kind: int, chunk: int,
             micro_batch: int) -> torch.Tensor:
        peer = self.prev_rank if kind == ACTIVATION else self.next_rank
        tensor = torch.empty(shape, dtype=dtype, device=device)
        op = dist.P2POp(dist.irecv, tensor, peer, tag=self._tag(kind, chunk, micro_batch))
        for work in dist.batch_isend_irecv([op]):
            work.wait()
        return tensor

    def release_completed(self) -> None:
        """Drop the buffers of sends that have completed."""
        self.pending = [(work, t) for work, t in self.pending if not work.is_completed()]

    def wait_all(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []
