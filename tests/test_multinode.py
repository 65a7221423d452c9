"""Multi-node layouts: the processes per node from each launcher, and a tensor-parallel group that would span nodes
stopped at start-up in one line. Two agents that train together are tests/test_beaker.py's replica test (two
``torchrun --nnodes 2 --node-rank K`` agents against one agent of 4 processes)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from megolmo.errors import MegolmoConfigError
from megolmo.parallel.bootstrap import discover, tasks_on_node
from megolmo.parallel.state import check_node_layout
from tests.conftest import write_tokens
from tests.helpers import ROOT, free_port
from tests.test_trainer import tiny_overrides


@pytest.mark.parametrize("env, per_node, source", [
    ({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, 8, "LOCAL_WORLD_SIZE=8"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)"}, 4,
     "SLURM_NTASKS_PER_NODE=4"),
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_TASKS_PER_NODE": "3(x2),1", "SLURM_NODEID": "2"}, 1,
     "SLURM_TASKS_PER_NODE=3(x2),1"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 2,
     "OMPI_COMM_WORLD_LOCAL_SIZE=2"),
    ({"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"}, 2, "MPI_LOCALNRANKS=2"),
    ({"BEAKER_REPLICA_RANK": "0", "BEAKER_REPLICA_COUNT": "2"}, 1, "one process per Beaker replica"),
    ({}, 1, "a single process"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, None, ""),  # ranks started by hand: the launcher does not say
])
def test_processes_per_node_from_each_launcher(env, per_node, source):
    launch = discover(env)
    assert (launch.local_world_size, launch.local_world_source) == (per_node, source)


def test_slurm_tasks_per_node_lists_each_node():
    assert [tasks_on_node("3(x2),1", node) for node in range(3)] == [3, 3, 1]
    assert tasks_on_node("8", 0) == 8


def test_a_tensor_parallel_group_across_nodes_is_one_line():
    check_node_layout(discover({"RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}), 4)
    check_node_layout(discover({"RANK": "0", "WORLD_SIZE": "2"}), 2)  # unknown: not checked
    with pytest.raises(MegolmoConfigError) as raised:
        check_node_layout(discover({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}), 4)
    assert str(raised.value) == ("parallel.tensor=4 does not divide the 2 processes per node (LOCAL_WORLD_SIZE=2): "
                                 "a tensor-parallel group would span nodes")


def test_two_agents_with_tensor_parallel_wider_than_a_node_stop_in_one_line(tmp_path):
    """``torchrun --nnodes 2 --node-rank K --rdzv-endpoint`` with 2 processes each and parallel.tensor=4: every rank
    stops before its process group exists, and only rank 0 prints the line."""
    tokens = write_tokens(tmp_path / "tokens.npy", 30_000, 300)
    endpoint = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                str(node), "--rdzv-endpoint", endpoint, "--nproc-per-node", "2", "-m", "megolmo.train",
                                *tiny_overrides(tmp_path, tokens, "parallel.tensor=4")],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for node in range(2)]
    try:
        outputs = [agent.communicate(timeout=180) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert all(agent.returncode != 0 for agent in agents), [err[-3000:] for _, err in outputs]
    errors = [line for _, err in outputs for line in err.splitlines() if line.startswith("megolmo:")]
    assert errors == ["megolmo: error: parallel.tensor=4 does not divide the 2 processes per node "
                      "(LOCAL_WORLD_SIZE=2): a tensor-parallel group would span nodes"], outputs[0][1][-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
    for rank, local_rank in ((2, 0), (3, 1)):  # node 1 holds ranks 2 and 3: node_rank * nproc + local_rank
        assert re.search(rf"rank\s+: {rank} \(local_rank: {local_rank}\)", outputs[1][1]), outputs[1][1][-3000:]
