"""The process-group layout: which ranks form each tensor-, data- and pipeline-parallel group.

Ranks are laid out ``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``: tensor-parallel ranks
vary fastest so that a TP group stays inside one node.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megolmo.errors import MegolmoConfigError
from megolmo.parallel.bootstrap import LaunchInfo, discover

Group = dist.ProcessGroup | None


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: Group = None
    pp_group: Group = None
    dp_group: Group = None
    stage_group: Group = None  # the TP x DP ranks of this pipeline stage (FP8 scaling factors are agreed here)
    world_group: Group = None
    device: torch.device = torch.device("cpu")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def layout_coordinates(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def check_layout(world_size: int, tp: int, pp: int) -> int:
    """Return the data-parallel size, or raise a one-line error naming the offending key."""
    if tp < 1 or pp < 1:
        raise MegolmoConfigError(f"parallel.tensor={tp}, parallel.pipeline={pp}: sizes must be >= 1")
    if world_size % (tp * pp):
        raise MegolmoConfigError(
            f"world size {world_size} is not divisible by parallel.tensor={tp} x parallel.pipeline={pp}")
    return world_size // (tp * pp)


def _new_groups(world_size: int, tp: int, dp: int, pp: int, rank: int):
    """Create every group on every rank (torch requires all ranks to call new_group identically)."""
    mine = {}
    ranks_of = {
        "tp": [[p * dp * tp + d * tp + t for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[p * dp * tp + d * tp + t for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[p * dp * tp + d * tp + t for p in range(pp)] for d in range(dp) for t in range(tp)],
        "stage": [[p * dp * tp + i for i in range(dp * tp)] for p in range(pp)],
    }
    for kind, groups in ranks_of.items():
        for ranks in groups:
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine[kind] = group
    return mine["tp"], mine["dp"], mine["pp"], mine["stage"]


def initialize(tp: int = 1, pp: int = 1, timeout_s: float = 600.0,
               launch: LaunchInfo | None = None) -> ParallelState:
    """Start the default process group (gloo on CPU, NCCL on CUDA) and build the TP/DP/PP groups.

    The CUDA settings live here: one device per local rank. ``CUDA_DEVICE_MAX_CONNECTIONS`` is left as the
    user set it: only Transformer Engine's communication/GEMM overlap needs it at 1, and megolmo keeps
    its tensor-parallel collectives outside TE's modules."""
    launch = launch or discover()
    dp = check_layout(launch.world_size, tp, pp)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if launch.world_size == 1 and not dist.is_initialized():
        return ParallelState(device=device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    tp_rank, dp_rank, pp_rank = layout_coordinates(launch.rank, tp, dp)
    tp_group, dp_group, pp_group, stage_group = _new_groups(launch.world_size, tp, dp, pp, launch.rank)
    return ParallelState(launch.rank, launch.world_size, launch.local_rank, tp, pp, dp,
                         tp_rank, pp_rank, dp_rank, tp_group, pp_group, dp_group, stage_group,
                         dist.group.WORLD, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
