"""Start-up checks whose outcome can differ between ranks (a file on one node's local disk, a GPU
without FP8 on one node) are agreed on: every rank learns of every rank's error, so all ranks stop
together and rank 0 reports each distinct error once, naming the ranks that saw it."""
from __future__ import annotations

import torch.distributed as dist

from megolmo.errors import MegolmoConfigError


def agree_on_errors(error: MegolmoConfigError | None) -> None:
    """Collective: raise on every rank if any rank passed an error (one line, every distinct message)."""
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    world = dist.get_world_size()
    messages: list[str | None] = [None] * world
    dist.all_gather_object(messages, None if error is None else str(error))
    ranks_by_message: dict[str, list[int]] = {}
    for rank, message in enumerate(messages):
        if message is not None:
            ranks_by_message.setdefault(message, []).append(rank)
    if not ranks_by_message:
        return
    parts = [message if len(ranks) == world else
             f"{message} (on rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))})"
             for message, ranks in ranks_by_message.items()]
    raise MegolmoConfigError("; ".join(parts)) from error
