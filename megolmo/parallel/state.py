"""The process-group layout: which ranks form each tensor-, data- and pipeline-parallel group.

Ranks are laid out ``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``: tensor-parallel ranks
vary fastest so that a TP group stays inside one node.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megolmo.errors import MegolmoConfigError, RendezvousError
from megolmo.parallel.bootstrap import LaunchInfo, agree_rendezvous, discover

Group = dist.ProcessGroup | None
RETRY_S = 0.5  # between attempts to reach a rendezvous that refuses: its host may simply not have started yet


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


def check_node_layout(launch: LaunchInfo, tp: int) -> None:
    """A one-line error unless this node's processes hold whole tensor-parallel groups. Launchers give each node
    consecutive ranks (torchrun: the agents' process counts summed in node-rank order), and TP groups are
    consecutive ranks, so divisibility on every node keeps each group inside one."""
    if launch.local_world_size is not None and launch.local_world_size % tp:
        raise MegolmoConfigError(
            f"parallel.tensor={tp} does not divide the {launch.local_world_size} processes per node "
            f"({launch.local_world_source}): a tensor-parallel group would span nodes")


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
    launch = agree_rendezvous(launch or discover())
    dp = check_layout(launch.world_size, tp, pp)
    check_node_layout(launch, tp)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if launch.world_size == 1 and not dist.is_initialized():
        return ParallelState(device=device)
    if not dist.is_initialized():
        reach_rendezvous(launch, timeout_s)
        join_process_group("nccl" if device.type == "cuda" else "gloo", launch, timeout_s)
    tp_rank, dp_rank, pp_rank = layout_coordinates(launch.rank, tp, dp)
    tp_group, dp_group, pp_group, stage_group = _new_groups(launch.world_size, tp, dp, pp, launch.rank)
    return ParallelState(launch.rank, launch.world_size, launch.local_rank, tp, pp, dp,
                         tp_rank, pp_rank, dp_rank, tp_group, pp_group, dp_group, stage_group,
                         dist.group.WORLD, device)


def hosts_store(launch: LaunchInfo) -> bool:
    """Rank 0 hosts the rendezvous store, unless torchrun's agent already does (its workers only connect)."""
    return launch.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def listen_in_place_of_store(launch: LaunchInfo) -> socket.socket:
    """A listener on the store's port, so that rank 0 can check that the address leads back to this host before
    torch starts the real store, whose client retries past its timeout, logging C++ frames at every attempt."""
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", launch.master_port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", launch.master_port))
    except OSError as error:
        raise RendezvousError(f"cannot host the rendezvous on port {launch.master_port} of this host: "
                              f"{error.strerror or error} ({launch.rendezvous_origin()}); choose a free port"
                              ) from None


def reach_rendezvous(launch: LaunchInfo, timeout_s: float) -> None:
    """Connect to the rendezvous address until it answers, or raise a one-line error once ``timeout_s`` has passed.

    Done here, before torch's store client, because that client overruns its timeout (up to about twice) and
    logs each failed attempt with its C++ stack to stderr; the connection opened here is closed unused."""
    listener = listen_in_place_of_store(launch) if hosts_store(launch) else None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                socket.create_connection((launch.master_addr, launch.master_port),
                                         timeout=max(deadline - time.monotonic(), 0.1)).close()
                return
            except OSError as error:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RendezvousError(unreachable(launch, timeout_s, error.strerror or str(error))) from None
            time.sleep(min(RETRY_S, left))
    finally:
        if listener is not None:
            listener.close()


def unreachable(launch: LaunchInfo, timeout_s: float, reason: str) -> str:
    return (f"cannot reach the rendezvous at {launch.master_addr}:{launch.master_port} within {timeout_s:g} s "
            f"({launch.rendezvous_origin()}; last attempt: {reason}); "
            "check that the address is the first node's and the port is open")


def join_process_group(backend: str, launch: LaunchInfo, timeout_s: float) -> None:
    """``init_process_group``; its rendezvous errors are torch ``DistError`` exceptions, which the entry point
    would take for a failed peer: raised instead as one line naming the address and where it came from."""
    where = f"{launch.master_addr}:{launch.master_port}"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        restart = restart_attempt()
        if restart is None:
            dist.init_process_group(backend, init_method=f"tcp://{where}", rank=launch.rank,
                                    world_size=launch.world_size, timeout=timeout)
        else:
            agent_store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=False,
                                        timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"megolmo/attempt{restart}", agent_store),
                                    rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    except dist.DistStoreError as error:  # the store answered but some ranks never came
        raise RendezvousError(f"not all {launch.world_size} ranks joined the rendezvous at {where} within "
                              f"{timeout_s:g} s ({first_line(error)}; {launch.rendezvous_origin()}); "
                              "check that every rank was given the same address and port") from error
    except dist.DistNetworkError as error:  # it answered, but not as a store does: another service's port?
        raise RendezvousError(f"the rendezvous at {where} answered, then failed ({first_line(error)}; "
                              f"{launch.rendezvous_origin()})") from error


def restart_attempt() -> int | None:
    """torchrun's restart count when its agent hosts the store. That store outlives the workers of an attempt
    (``--max-restarts``), and the process-group keys the previous attempt left in it (every rank's gloo
    address) would be read by the next one, which then connects to ranks that are gone: each attempt keeps
    its keys under a prefix of its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
