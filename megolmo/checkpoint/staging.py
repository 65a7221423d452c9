"""Host copies of the optimizer's state for an asynchronous save, taken before the next step changes it.

The copies are allocated at the first asynchronous save and reused by every later one (at most one save
is in flight, so the previous one has finished with them): host memory the size of this rank's state,
pinned when the state is on a GPU so that the device-to-host copies run at full speed. Flat shards are
copied whole, a few large copies rather than one per tensor piece.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.staging import AsyncStager


class HostStaging:
    def __init__(self) -> None:
        self.copies: dict[str, list[torch.Tensor]] | None = None

    def stage(self, flats: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        if self.copies is None or self.copies.keys() != flats.keys():
            self.copies = {key: [torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in shards]
                           for key, shards in flats.items()}
        on_gpu = False
        for key, shards in flats.items():
            for copy, shard in zip(self.copies[key], shards):
                copy.copy_(shard, non_blocking=shard.is_cuda)
                on_gpu |= shard.is_cuda
        if on_gpu:
            torch.cuda.synchronize()  # the copies must be complete before the writer thread reads them
        return self.copies


class AlreadyStaged(AsyncStager):
    """Tells ``dcp.async_save`` the state dict is a host copy already (``HostStaging``): no second copy."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None: ...

    def close(self) -> None: ...
