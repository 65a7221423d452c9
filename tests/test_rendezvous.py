"""A rendezvous that cannot be reached: each rank says so in one line (address, port, timeout and the variable
that set them) once the timeout has passed, not after torch's retries with their C++ frames.

Not under torchrun itself: given an unreachable ``--master-addr``, its agent fails in its own rendezvous before
any worker starts, and its workers connect to the agent's store. So the ranks here are started as torchrun
would start a second node (``RANK``/``WORLD_SIZE`` by hand) and by MPICH's mpiexec.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megolmo.errors import RendezvousError
from megolmo.parallel.bootstrap import LaunchInfo, discover
from megolmo.parallel.state import initialize
from tests.conftest import write_tokens
from tests.helpers import ROOT, free_port, run_entry_point
from tests.test_trainer import tiny_overrides

TIMEOUT_S = 4


def test_discover_names_the_variable_that_set_the_address():
    port = {"MASTER_PORT": "29511"}
    cases = [
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", **port}, "MASTER_ADDR",
         "MASTER_ADDR=n1, MASTER_PORT=29511 set by torchrun --master-addr/--master-port or the environment"),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[004-005]", **port},
         "SLURM_JOB_NODELIST", "gpu004, the first host of SLURM_JOB_NODELIST, MASTER_PORT=29511"),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[004-005]", "MASTER_ADDR": "n2"},
         "MASTER_ADDR", "MASTER_ADDR=n2, port 29500 by default (no MASTER_PORT set)"),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "n3", **port}, "MASTER_ADDR",
         "MASTER_ADDR=n3, MASTER_PORT=29511"),
        ({"PMI_RANK": "1", "PMI_SIZE": "2", **port}, "default",
         "127.0.0.1 by default (no address variable set), MASTER_PORT=29511"),
        ({"BEAKER_REPLICA_RANK": "1", "BEAKER_REPLICA_COUNT": "2", "BEAKER_LEADER_REPLICA_HOSTNAME": "leader"},
         "BEAKER_LEADER_REPLICA_HOSTNAME",
         "BEAKER_LEADER_REPLICA_HOSTNAME=leader, port 29500 by default (no MASTER_PORT set)"),
    ]
    for env, source, origin in cases:
        launch = discover(env)
        assert (launch.addr_source, launch.rendezvous_origin()) == (source, origin), env
    assert discover({"RANK": "0", "WORLD_SIZE": "2", **port}).port_source == "MASTER_PORT"
    assert discover({}).addr_source == discover({}).port_source == "default"


def _launch(rank: int, addr: str, port: int) -> LaunchInfo:
    return LaunchInfo(rank, 2, 0, addr, port, "mpi", "MASTER_ADDR", "MASTER_PORT")


def test_closed_port_fails_at_the_timeout_in_one_line():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RendezvousError) as raised:
        initialize(launch=_launch(1, "127.0.0.1", port), timeout_s=1.5)
    assert 1.5 <= time.monotonic() - start < 2.5
    assert str(raised.value) == (
        f"cannot reach the rendezvous at 127.0.0.1:{port} within 1.5 s (MASTER_ADDR=127.0.0.1, MASTER_PORT={port}; "
        "last attempt: Connection refused); check that the address is the first node's and the port is open")


def test_rank_zero_with_its_port_taken_says_so():
    with socket.create_server(("", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(RendezvousError, match=f"cannot host the rendezvous on port {port} of this host: "
                                                  "Address already in use"):
            initialize(launch=_launch(0, "127.0.0.1", port), timeout_s=1)


def test_missing_ranks_are_named_not_blamed_on_a_failed_peer():
    port = free_port()
    with pytest.raises(RendezvousError) as raised:
        initialize(launch=_launch(0, "127.0.0.1", port), timeout_s=1)
    assert str(raised.value).startswith(f"not all 2 ranks joined the rendezvous at 127.0.0.1:{port} within 1 s (")
    assert str(raised.value).endswith(f"1/2 clients joined.; MASTER_ADDR=127.0.0.1, MASTER_PORT={port}); "
                                      "check that every rank was given the same address and port")


def test_another_service_at_the_address_is_named():
    """The address answers, but not as a store: torch logs its retries (C++ frames), then one line says so."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        def refuse_to_talk():
            with contextlib.suppress(OSError):
                while True:
                    server.accept()[0].close()
        threading.Thread(target=refuse_to_talk, daemon=True).start()
        port = server.getsockname()[1]
        with pytest.raises(RendezvousError, match=f"^the rendezvous at 127.0.0.1:{port} answered, then failed"):
            initialize(launch=_launch(1, "127.0.0.1", port), timeout_s=1)


@pytest.fixture
def unanswering_addresses():
    """(refusing, dropping): a network namespace of the test's own behind a veth pair. Its address has no
    listener, so it refuses connections; an address routed through it is dropped there (it does not forward)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network namespace needs root and iproute2")
    tag = os.getpid()
    ns, host_end, ns_end, net = f"megolmo-rdv-{tag}", f"mrdv{tag}h", f"mrdv{tag}n", f"10.251.{tag % 250}"
    steps = [(["ip", "netns", "add", ns], ["ip", "netns", "del", ns]),
             (["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end],
              ["ip", "link", "del", host_end]),
             (["ip", "link", "set", ns_end, "netns", ns], None),
             (["ip", "addr", "add", f"{net}.1/30", "dev", host_end], None),
             (["ip", "link", "set", host_end, "up"], None),
             (["ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", ns_end], None),
             (["ip", "-n", ns, "link", "set", ns_end, "up"], None),
             (["ip", "route", "add", f"{net}.6/32", "via", f"{net}.2", "dev", host_end], None)]
    undo = []
    try:
        for command, undo_command in steps:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                pytest.skip(f"cannot set up a network namespace: {' '.join(command)}: {done.stderr.strip()}")
            if undo_command:
                undo.append(undo_command)
        yield f"{net}.2", f"{net}.6"
    finally:
        for command in reversed(undo):  # the link goes first, taking its peer and the route with it
            subprocess.run(command, capture_output=True)


def test_dropped_connections_fail_at_the_timeout(unanswering_addresses):
    _, dropping = unanswering_addresses
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=f"cannot reach the rendezvous at {dropping}:.* within 2 s .*"
                                              "last attempt: timed out"):
        initialize(launch=_launch(1, dropping, free_port()), timeout_s=2)
    assert 2 <= time.monotonic() - start < 3


def _check_one_line_per_rank(result: subprocess.CompletedProcess, elapsed: float, addr: str, port: int,
                             ranks: list[int], source: str = "MASTER_ADDR") -> list[str]:
    """Exit 1 after the timeout (not twice it), one ``megolmo:`` line per rank naming address, port, timeout and
    variables, and no C++ frames."""
    assert result.returncode != 0, result.stderr[-3000:]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 60
    assert "frame #" not in result.stdout + result.stderr, result.stderr[-3000:]
    lines = sorted(line for line in result.stderr.splitlines() if line.startswith("megolmo:"))
    assert len(lines) == len(ranks), result.stderr[-3000:]
    for rank, line in zip(ranks, lines):
        origin = f"MASTER_ADDR={addr}" if source == "MASTER_ADDR" else f"{addr}, the first host of {source}"
        assert line.startswith(f"megolmo: rank {rank}: error: cannot reach the rendezvous at {addr}:{port} "
                               f"within {TIMEOUT_S} s ({origin}, MASTER_PORT={port}"), line
    return lines


def test_second_node_without_rendezvous_says_so_in_one_line(tmp_path):
    """A node started by hand as torchrun would start node 1, while nothing listens at MASTER_ADDR:MASTER_PORT."""
    tokens = write_tokens(tmp_path / "tokens.npy", 30_000, 300)
    port, error_file = free_port(), tmp_path / "error.json"
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_ERROR_FILE": str(error_file)}
    start = time.monotonic()
    result = run_entry_point(tiny_overrides(tmp_path, tokens, f"parallel.timeout_s={TIMEOUT_S}"), env=env,
                             timeout=TIMEOUT_S + 120)
    [line] = _check_one_line_per_rank(result, time.monotonic() - start, "127.0.0.1", port, ranks=[1])
    assert line.endswith("set by torchrun --master-addr/--master-port or the environment; last attempt: "
                         "Connection refused); check that the address is the first node's and the port is open")
    assert json.loads(error_file.read_text())["message"]["message"] == line  # torchrun's summary would name it


def test_mpiexec_ranks_with_an_address_that_refuses(tmp_path, unanswering_addresses):
    """Rank 0 too: the store it would host is not at MASTER_ADDR, so no rank fails because of another."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    assert mpiexec.exists(), "the test extra installs mpich, which provides mpiexec"
    refusing, _ = unanswering_addresses
    tokens = write_tokens(tmp_path / "tokens.npy", 30_000, 300)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR=refusing, MASTER_PORT=str(port))
    start = time.monotonic()
    result = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "megolmo.train",
                             *tiny_overrides(tmp_path, tokens, f"parallel.timeout_s={TIMEOUT_S}")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 120)
    lines = _check_one_line_per_rank(result, time.monotonic() - start, refusing, port, ranks=[0, 1])
    assert all("last attempt: Connection refused" in line for line in lines)
    assert "another rank failed" not in result.stderr


def test_srun_ranks_whose_first_node_drops_connections(tmp_path, unanswering_addresses):
    """srun's variables, the address from SLURM_JOB_NODELIST: a connect timeout rather than a refusal."""
    _, dropping = unanswering_addresses
    tokens = write_tokens(tmp_path / "tokens.npy", 30_000, 300)
    port = free_port()
    overrides = tiny_overrides(tmp_path, tokens, f"parallel.timeout_s={TIMEOUT_S}")
    start = time.monotonic()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(OMP_NUM_THREADS="1", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                   SLURM_JOB_NODELIST=dropping, MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "megolmo.train", *overrides], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=TIMEOUT_S + 120) for proc in procs]
    elapsed = time.monotonic() - start
    for rank, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        [line] = _check_one_line_per_rank(result, elapsed, dropping, port, ranks=[rank], source="SLURM_JOB_NODELIST")
        assert "last attempt: timed out" in line
