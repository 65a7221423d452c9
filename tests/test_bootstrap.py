"""Rank discovery from each launcher's variables, the process-group layout, and real multi-rank runs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megolmo.errors import MegolmoConfigError
from megolmo.parallel.bootstrap import agree_rendezvous, discover, first_host
from megolmo.parallel.state import check_layout, layout_coordinates
from tests.conftest import write_tokens
from tests.helpers import ROOT, free_port, run_entry_point
from tests.test_trainer import tiny_overrides


@pytest.mark.parametrize("nodelist, host", [
    ("node07", "node07"), ("gpu[003-005,010]", "gpu003"), ("gpu[12,14],cpu1", "gpu12"), ("a-b-1,a-b-2", "a-b-1")])
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_discover_each_launcher():
    torchrun = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                         "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr, torchrun.master_port,
            torchrun.launcher) == (3, 8, 1, "n1", 1234, "torchrun")
    slurm = discover({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                      "SLURM_JOB_NODELIST": "gpu[004-005]"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.launcher) == \
        (5, 16, 5, "gpu004", "slurm")
    ompi = discover({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                     "MASTER_ADDR": "h"})
    assert (ompi.rank, ompi.world_size, ompi.local_rank, ompi.launcher) == (2, 4, 2, "mpi")
    mpich = discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"})
    assert (mpich.rank, mpich.world_size, mpich.local_rank) == (1, 2, 1)
    beaker = discover({"BEAKER_REPLICA_RANK": "1", "BEAKER_REPLICA_COUNT": "2",
                       "BEAKER_LEADER_REPLICA_HOSTNAME": "leader"})
    assert (beaker.rank, beaker.world_size, beaker.master_addr, beaker.launcher) == (1, 2, "leader", "beaker")
    assert discover({}).world_size == 1


def test_layout_tensor_fastest_then_data_then_pipeline():
    # rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank, with tp=2, dp=2, pp=2
    assert [layout_coordinates(r, 2, 2) for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert check_layout(8, 2, 2) == 2
    with pytest.raises(MegolmoConfigError, match="world size 6 is not divisible by parallel.tensor=4"):
        check_layout(6, 4, 1)


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_data_parallel_ranks_match_one_process(tmp_path):
    """torchrun with 2 ranks (DP=2) and a default run directory shared by both ranks."""
    tokens = write_tokens(tmp_path / "tokens.npy", 30_000, 300)
    common = ["trainer.max_steps=4", "optim.warmup_steps=1"]
    single = run_entry_point(tiny_overrides(tmp_path / "one", tokens, *common))
    assert single.returncode == 0, single.stderr
    overrides = [o for o in tiny_overrides(tmp_path / "two", tokens, *common) if not o.startswith("trainer.run_dir")]
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megolmo.train", f"hydra.searchpath=[file://{ROOT}/conf]", *overrides]
    two = subprocess.run(cmd, cwd=workdir, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr
    run_dirs = list((workdir / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs  # one directory for both ranks
    assert json.loads((run_dirs[0] / "summary.json").read_text())["layout"]["data"] == 2
    for a, b in zip(_losses(tmp_path / "one" / "run"), _losses(run_dirs[0])):
        assert a == pytest.approx(b, rel=1e-5)


def test_slurm_variables_launch_real_ranks(tmp_path):
    """Two processes that know their rank only from SLURM_* variables form one job."""
    tokens = write_tokens(tmp_path / "tokens.npy", 30_000, 300)
    port = str(free_port())
    overrides = tiny_overrides(tmp_path, tokens, "trainer.max_steps=2", "optim.warmup_steps=1")
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                   SLURM_JOB_NODELIST="localhost", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "megolmo.train", *overrides], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outputs]
    assert "step      2/2" in outputs[0][0] and outputs[1][0] == ""  # only rank 0 prints
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["layout"]["world_size"] == 2


def test_bad_layout_ends_every_rank(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.npy", 30_000, 300)
    result = run_entry_point(tiny_overrides(tmp_path, tokens, "parallel.tensor=3"), nproc=2, timeout=120)
    assert result.returncode != 0
    assert "world size 2 is not divisible by parallel.tensor=3" in result.stderr


MPIEXEC = Path(sys.executable).parent / "mpiexec"
TWO_NODES = ["-launcher", "fork", "-hosts", "nodeA:2,nodeB:2", "-n", "4"]  # Hydra's proxies as 2 nodes of 2 ranks
PROBE = """
import json, pathlib, sys
from megolmo.parallel.bootstrap import _mpi_exchange, agree_rendezvous, discover
first, again = agree_rendezvous(discover()), agree_rendezvous(discover())
assert first == again and _mpi_exchange.cache_info().misses == 1
pathlib.Path(sys.argv[1], f"{first.rank}.json").write_text(json.dumps([
    first.rank, first.local_rank, first.local_world_size, first.master_addr, first.master_port,
    first.rendezvous_origin(), first.local_world_source]))
"""  # each rank writes a file of its own: mpiexec interleaves the ranks' output


def _mpi_env() -> dict[str, str]:
    """This environment without any rendezvous variable: mpiexec alone starts the ranks."""
    assert MPIEXEC.exists(), "the test extra installs mpich, which provides mpiexec"
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_mpiexec_ranks_agree_on_rank_zeros_host_and_port_once(tmp_path):
    """Two Hydra proxies started locally are two nodes to MPI: local ranks 0, 1, 0, 1 from COMM_TYPE_SHARED."""
    result = subprocess.run([str(MPIEXEC), *TWO_NODES, sys.executable, "-c", PROBE, str(tmp_path)], cwd=ROOT,
                            env=_mpi_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted(json.loads(path.read_text()) for path in tmp_path.glob("*.json"))
    assert [(r[0], r[1], r[2]) for r in ranks] == [(0, 0, 2), (1, 1, 2), (2, 0, 2), (3, 1, 2)]
    _, _, _, addr, port, origin, per_node = ranks[0]
    assert addr == socket.gethostname() and all(r[3:] == ranks[0][3:] for r in ranks)
    assert origin == (f"{addr}, the host name of MPI rank 0 broadcast with mpi4py (no MASTER_ADDR set), "
                      f"port {port}, chosen free by MPI rank 0 and broadcast with mpi4py")
    assert per_node == "2 ranks in MPI's COMM_TYPE_SHARED communicator"


def test_agreement_is_only_for_mpi_launches_without_an_address(monkeypatch):
    """Other launches never import mpi4py (importing it initialises MPI); without it, an MPI launch that needs it
    fails in one line saying what to do."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    for env in ({"RANK": "0", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, {},
                {"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "h"}, {"PMI_RANK": "0", "PMI_SIZE": "1"}):
        assert agree_rendezvous(discover(env)) == discover(env)
    with pytest.raises(MegolmoConfigError, match="^an MPI launch without MASTER_ADDR agrees on the rendezvous "
                                                 "through mpi4py, which is not installed: pip install mpi4py"):
        agree_rendezvous(discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}))


def test_mpiexec_without_rendezvous_variables_matches_torchrun(tmp_path):
    """``mpiexec -n 4`` over two nodes of 2 (TP 2 inside each, DP 2 across) with no MASTER_ADDR/MASTER_PORT,
    against ``torchrun --nproc-per-node 4``."""
    tokens = write_tokens(tmp_path / "tokens.npy", 30_000, 300)
    common = ["trainer.max_steps=3", "optim.warmup_steps=1", "parallel.tensor=2"]
    mpi = subprocess.run([str(MPIEXEC), *TWO_NODES, sys.executable, "-m", "megolmo.train",
                          *tiny_overrides(tmp_path / "mpi", tokens, *common)],
                         cwd=ROOT, env=_mpi_env(), capture_output=True, text=True, timeout=180)
    assert mpi.returncode == 0, mpi.stderr[-3000:]
    torchrun = run_entry_point(tiny_overrides(tmp_path / "torchrun", tokens, *common), nproc=4)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    layout = json.loads((tmp_path / "mpi" / "run" / "summary.json").read_text())["layout"]
    assert (layout["world_size"], layout["tensor"], layout["data"]) == (4, 2, 2)
    mpi_losses, torchrun_losses = _losses(tmp_path / "mpi" / "run"), _losses(tmp_path / "torchrun" / "run")
    assert len(mpi_losses) == 3 and mpi_losses == pytest.approx(torchrun_losses, rel=1e-5)


def test_an_error_only_one_rank_sees_stops_every_rank_with_one_line(tmp_path):
    """A token file on one node's local disk only: rank 1 cannot open its file. Every rank stops at
    start-up (not at the collective timeout), and rank 0 names the file and the rank that missed it."""
    from tests.conftest import write_tokens
    from tests.test_trainer import tiny_overrides

    write_tokens(tmp_path / "tokens_0.npy", 20_000, 300)
    local_path = str(tmp_path / "tokens_${oc.env:LOCAL_RANK}.npy")
    overrides = [o for o in tiny_overrides(tmp_path, local_path) if not o.startswith("data.paths")]
    run = run_entry_point([f"data.paths=[{local_path}]", *overrides, "parallel.timeout_s=120"], nproc=2,
                          timeout=100)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("megolmo: error:")]
    assert len(errors) == 1 and str(tmp_path / "tokens_1.npy") in errors[0] and "(on rank 1)" in errors[0], \
        run.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
