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


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


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


def discover(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's variables; torchrun's take precedence since it may run inside Slurm."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                          addr, port, "slurm")
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                          int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "mpi")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        local = env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", 0))
        return LaunchInfo(int(env["PMI_RANK"]), int(env["PMI_SIZE"]), int(local),
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "mpi")
    if "BEAKER_REPLICA_RANK" in env and "BEAKER_REPLICA_COUNT" in env:
        return LaunchInfo(int(env["BEAKER_REPLICA_RANK"]), int(env["BEAKER_REPLICA_COUNT"]), 0,
                          env.get("BEAKER_LEADER_REPLICA_HOSTNAME", "127.0.0.1"), port, "beaker")
    return LaunchInfo(0, 1, 0, "127.0.0.1", port, "single")
