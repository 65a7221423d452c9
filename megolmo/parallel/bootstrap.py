"""Find this process's rank, world size and rendezvous address from whichever launcher started it.

Supported: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``), Slurm ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, first host of ``SLURM_JOB_NODELIST``),
MPI (Open MPI ``OMPI_COMM_WORLD_*``; MPICH/Hydra ``PMI_*``) and Beaker replicas
(``BEAKER_REPLICA_RANK``/``BEAKER_REPLICA_COUNT``/``BEAKER_LEADER_REPLICA_HOSTNAME``, one process per replica).
A bare ``python -m megolmo.train`` is a world of one.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT = 29500
DEFAULT_ADDR = "127.0.0.1"


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

    def rendezvous_origin(self) -> str:
        """Which variable set the address and which the port, e.g. ``MASTER_ADDR=n1, MASTER_PORT=29500``."""
        addr = {"default": f"{self.master_addr} by default (no address variable set)",
                "SLURM_JOB_NODELIST": f"{self.master_addr}, the first host of SLURM_JOB_NODELIST",
                }.get(self.addr_source, f"{self.addr_source}={self.master_addr}")
        port = f"MASTER_PORT={self.master_port}" if self.port_source == "MASTER_PORT" else \
            f"port {self.master_port} by default (no MASTER_PORT set)"
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


def _address(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str]:
    """(address, variable) from the first of ``names`` that is set, else the loopback default."""
    for name in names:
        if env.get(name):
            return (first_host(env[name]) if name == "SLURM_JOB_NODELIST" else env[name]), name
    return DEFAULT_ADDR, "default"


def discover(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's variables; torchrun's take precedence since it may run inside Slurm."""
    env = os.environ if env is None else env
    port_source = "MASTER_PORT" if env.get("MASTER_PORT") else "default"
    port = int(env["MASTER_PORT"]) if port_source == "MASTER_PORT" else DEFAULT_PORT

    def info(rank, world_size, local_rank, launcher: str, *addr_names: str) -> LaunchInfo:
        addr, addr_source = _address(env, addr_names)
        return LaunchInfo(int(rank), int(world_size), int(local_rank), addr, port, launcher, addr_source, port_source)

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
