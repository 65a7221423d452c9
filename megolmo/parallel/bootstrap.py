"""Find this process's rank, world size and rendezvous address from whichever launcher started it.

Supported: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``), Slurm ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, first host of ``SLURM_JOB_NODELIST``),
MPI (Open MPI ``OMPI_COMM_WORLD_*``; MPICH/Hydra ``PMI_*``) and Beaker replicas
(``BEAKER_REPLICA_RANK``/``BEAKER_REPLICA_COUNT``/``BEAKER_LEADER_REPLICA_HOSTNAME``, one process per replica).
A bare ``python -m megolmo.train`` is a world of one.

An MPI launch without ``MASTER_ADDR`` agrees on the rendezvous through mpi4py (``agree_rendezvous``): rank 0
broadcasts its host name and (without ``MASTER_PORT``) a free port. mpi4py is imported only then, since importing
it initialises MPI.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from megolmo.errors import MegolmoConfigError

DEFAULT_PORT = 29500
DEFAULT_ADDR = "127.0.0.1"
MPI4PY = "mpi4py"  # the source of an address or port that MPI rank 0 chose and broadcast


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    addr_source: str = "default"  # the variable that set master_addr: a wrong address is fixed where it was set
    port_source: str = "default"
    local_world_size: int | None = None  # processes on this node; None where the launcher does not say
    local_world_source: str = ""  # where local_world_size came from, e.g. ``LOCAL_WORLD_SIZE=8``

    def rendezvous_origin(self) -> str:
        """Which variable set the address and which the port, e.g. ``MASTER_ADDR=n1, MASTER_PORT=29500``."""
        addr = {"default": f"{self.master_addr} by default (no address variable set)",
                "SLURM_JOB_NODELIST": f"{self.master_addr}, the first host of SLURM_JOB_NODELIST",
                MPI4PY: f"{self.master_addr}, the host name of MPI rank 0 broadcast with mpi4py (no MASTER_ADDR set)",
                }.get(self.addr_source, f"{self.addr_source}={self.master_addr}")
        port = {"MASTER_PORT": f"MASTER_PORT={self.master_port}",
                MPI4PY: f"port {self.master_port}, chosen free by MPI rank 0 and broadcast with mpi4py",
                }.get(self.port_source, f"port {self.master_port} by default (no MASTER_PORT set)")
        if self.launcher == "torchrun":
            return f"{addr}, {port} set by torchrun --master-addr/--master-port or the environment"
        return f"{addr}, {port}"


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list such as ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot parse a host name")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Processes on node ``node`` from Slurm's ``SLURM_TASKS_PER_NODE`` such as ``3(x2),1`` -> 3, 3, 1."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r}: cannot parse a task count")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[node]


def _local_world(env: Mapping[str, str], launcher: str) -> tuple[int | None, str]:
    """(processes on this node, the variable that says so) from the launcher's variables; (None, "") if none does."""
    names = {"torchrun": ("LOCAL_WORLD_SIZE",), "slurm": ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
             "mpi": ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")}.get(launcher, ())
    for name in names:
        if env.get(name):
            value = env[name]
            count = tasks_on_node(value, int(env.get("SLURM_NODEID", 0))) if name == "SLURM_TASKS_PER_NODE" \
                else int(value)
            return count, f"{name}={value}"
    if launcher == "beaker":
        return 1, "one process per Beaker replica"
    if launcher == "single":
        return 1, "a single process"
    return None, ""


def _address(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str]:
    """(address, variable) from the first of ``names`` that is set, else the loopback default."""
    for name in names:
        if env.get(name):
            return (first_host(env[name]) if name == "SLURM_JOB_NODELIST" else env[name]), name
    return DEFAULT_ADDR, "default"


def discover(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's variables; torchrun's take precedence since it may run inside Slurm.

    Reads only: an MPI launch without ``MASTER_ADDR`` gets its address from ``agree_rendezvous``."""
    env = os.environ if env is None else env
    port_source = "MASTER_PORT" if env.get("MASTER_PORT") else "default"
    port = int(env["MASTER_PORT"]) if port_source == "MASTER_PORT" else DEFAULT_PORT

    def info(rank, world_size, local_rank, launcher: str, *addr_names: str) -> LaunchInfo:
        addr, addr_source = _address(env, addr_names)
        return LaunchInfo(int(rank), int(world_size), int(local_rank), addr, port, launcher, addr_source, port_source,
                          *_local_world(env, launcher))

    if "RANK" in env and "WORLD_SIZE" in env:
        return info(env["RANK"], env["WORLD_SIZE"], env.get("LOCAL_RANK", 0), "torchrun", "MASTER_ADDR")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return info(env["SLURM_PROCID"], env["SLURM_NTASKS"], env.get("SLURM_LOCALID", 0), "slurm",
                    "MASTER_ADDR", "SLURM_JOB_NODELIST")
    if "OMPI_COMM_WORLD_RANK" in env:
        return info(env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"],
                    env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0), "mpi", "MASTER_ADDR")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return info(env["PMI_RANK"], env["PMI_SIZE"], env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", 0)),
                    "mpi", "MASTER_ADDR")
    if "BEAKER_REPLICA_RANK" in env and "BEAKER_REPLICA_COUNT" in env:
        return info(env["BEAKER_REPLICA_RANK"], env["BEAKER_REPLICA_COUNT"], 0, "beaker",
                    "BEAKER_LEADER_REPLICA_HOSTNAME")
    return info(0, 1, 0, "single")


def agree_rendezvous(launch: LaunchInfo) -> LaunchInfo:
    """``launch``, or for an MPI launch without ``MASTER_ADDR`` the address of rank 0's host (and, without
    ``MASTER_PORT``, a free port there) with the local rank and node size of MPI's shared-memory communicator.

    Called by ``initialize`` rather than ``discover``: a missing mpi4py is then a config error of the trainer,
    and the broadcast, a collective, happens at one point of every rank's start-up."""
    if launch.launcher != "mpi" or launch.addr_source != "default" or launch.world_size == 1:
        return launch
    choose_port = launch.port_source == "default"
    addr, port, local_rank, local_world_size = _mpi_exchange(launch.world_size, choose_port)
    agreed = dataclasses.replace(launch, master_addr=addr, addr_source=MPI4PY, local_rank=local_rank,
                                 local_world_size=local_world_size,
                                 local_world_source=f"{local_world_size} ranks in MPI's COMM_TYPE_SHARED communicator")
    return dataclasses.replace(agreed, master_port=port, port_source=MPI4PY) if choose_port else agreed


@functools.cache
def _mpi_exchange(world_size: int, choose_port: bool) -> tuple[str, int, int, int]:
    """(rank 0's host name, its free port or 0, local rank, processes on this node), once per process: a second
    exchange would be a collective that not every rank need join."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise MegolmoConfigError("an MPI launch without MASTER_ADDR agrees on the rendezvous through mpi4py, which "
                                 "is not installed: pip install mpi4py (megolmo[mpi]), or set MASTER_ADDR and "
                                 "MASTER_PORT for every rank") from None
    world = MPI.COMM_WORLD
    if world.Get_size() != world_size:
        raise MegolmoConfigError(f"mpi4py's MPI sees {world.Get_size()} processes where the launcher started "
                                 f"{world_size}: mpi4py uses another MPI library than the mpiexec of this job; "
                                 "set MASTER_ADDR and MASTER_PORT, or install mpi4py for this MPI")
    chosen = (socket.gethostname(), free_port() if choose_port else 0) if world.Get_rank() == 0 else None
    addr, port = world.bcast(chosen, root=0)
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local = node.Get_rank(), node.Get_size()
    node.Free()
    return addr, port, *local


def free_port() -> int:
    """A port no socket of this host uses now: rank 0 binds it again moments later for the rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
