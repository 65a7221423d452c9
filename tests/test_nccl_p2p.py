"""NCCL's p2p rules on CPU: hand-written programs, the old engine's recorded programs (which deadlock), and
every pipeline schedule recorded live through the real ``TrainStep`` (which must not)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_torchrun, run_worker
from tests.nccl_p2p import load_programs, replay
from tests.workers.record_schedules import CASES, case_name

OLD_ENGINE_PROGRAMS = sorted((ROOT / "tests" / "data" / "old_engine_p2p").glob("p*_v*.json"))

def issue(batch: int, *ops: tuple[str, int], numel: int = 4096, dtype: str = "float32") -> dict:
    return {"issue": batch, "ops": [[kind, peer, numel, dtype] for kind, peer in ops]}


def wait(batch: int) -> dict:
    return {"wait": batch}


def test_megatron_style_1f1b_exchange_completes():
    # two stages, two micro-batches; each send is batched with the receive it must overlap
    first = [issue(0, ("send", 1)), wait(0),                                 # F0
             issue(1, ("send", 1), ("recv", 1)), wait(1),                    # F1, send_forward_recv_backward
             issue(2, ("recv", 1)), wait(2)]                                 # B1's gradient
    last = [issue(0, ("recv", 0)), wait(0),                                  # recv_forward
            issue(1, ("send", 0), ("recv", 0)), wait(1),                     # B0, send_backward_recv_forward
            issue(2, ("send", 0)), wait(2)]                                  # B1
    result = replay({0: first, 1: last})
    assert result.completed and not result.deadlocked and not result.errors, result.description


def test_crossing_sends_deadlock():
    program = lambda peer: [issue(0, ("send", peer)), issue(1, ("recv", peer)), wait(1), wait(0)]  # noqa: E731
    result = replay({0: program(1), 1: program(0)})
    assert result.deadlocked and not result.errors
    assert result.stuck == [(0, 0), (1, 0)]
    assert "rank 0 batch 0 (send 4096 float32 to 1) has started and waits for rank 1 batch 1" in result.description


def test_a_wait_orders_later_sends_after_it():
    # a ring where each rank forwards what it received: nobody has data to send first
    ring = {rank: [issue(0, ("recv", (rank - 1) % 3)), wait(0), issue(1, ("send", (rank + 1) % 3))]
            for rank in range(3)}
    result = replay(ring)
    assert result.deadlocked
    assert "sends data computed after waiting on rank 0 batch 0 (recv 4096 float32 from 2)" in result.description
    ring[0] = [issue(0, ("send", 1)), issue(1, ("recv", 2)), wait(1), wait(0)]  # rank 0 starts the ring
    assert replay(ring).completed


def test_a_wait_does_not_block_later_receives():
    # rank 1's second receive must start while its first is pending: the host does not block on wait
    programs = {0: [issue(0, ("recv", 2)), wait(0), issue(1, ("send", 1))],
                1: [issue(0, ("recv", 0)), wait(0), issue(1, ("recv", 2)), wait(1)],
                2: [issue(0, ("send", 1)), wait(0), issue(1, ("send", 0)), wait(1)]}
    assert replay(programs).completed


def test_size_and_dtype_mismatches_are_reported():
    result = replay({0: [issue(0, ("send", 1), numel=4), issue(1, ("send", 1), dtype="bfloat16")],
                     1: [issue(0, ("recv", 0), numel=8), issue(1, ("recv", 0))]})
    assert result.completed
    assert len(result.errors) == 2
    assert "0->1 message 0" in result.errors[0] and "sends 4 float32" in result.errors[0] \
        and "receives 8 float32" in result.errors[0]
    assert "sends 4096 bfloat16" in result.errors[1]


def test_unmatched_ops_are_reported():
    result = replay({0: [issue(0, ("send", 1)), issue(1, ("send", 1))], 1: [issue(0, ("recv", 0))]})
    assert result.deadlocked and result.stuck == [(0, 1)]
    assert result.errors == ["rank 0 batch 1 (send 4096 float32 to 1): its send 4096 float32 to 1 has no matching "
                             "recv on rank 1"]
    assert "waits for a partner for its send" in result.description


@pytest.mark.parametrize("path", OLD_ENGINE_PROGRAMS, ids=lambda path: path.stem)
def test_old_engine_deadlocks_on_nccl(path):
    programs = {int(rank): events for rank, events in json.loads(path.read_text()).items()}
    pipeline = int(path.stem.split("_")[0][1:])
    assert sorted(programs) == list(range(pipeline))
    result = replay(programs)
    assert result.deadlocked and not result.errors
    # the first stage's second activation send crosses the second stage's first gradient send
    assert "rank 0 batch" in result.description and "(send 4096 float32 to 1) has started" in result.description


def test_old_engine_programs_cover_each_layout():
    assert [path.stem for path in OLD_ENGINE_PROGRAMS] == ["p2_v1", "p2_v2", "p4_v1", "p4_v2"]


LIBRARY_SCRIPT = """
import os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.pipelining.schedules import _batch_p2p
from tests.nccl_p2p import install_recorder
dist.init_process_group("gloo")
rank, x, y = dist.get_rank(), torch.zeros(4), torch.zeros(4)
pair = dist.new_group([1, 2])  # group ranks 0, 1 are global ranks 1, 2
unwrapped_irecv = dist.irecv
built_before = dist.P2POp(dist.isend, x, group=pair, group_peer=1) if rank == 1 else None
install_recorder(Path(sys.argv[1]) / f"rank{os.environ['RANK']}.json")
if rank == 0:
    dist.send_object_list(["hello"], dst=1)
    [work.wait() for work in _batch_p2p([dist.P2POp(dist.isend, x, 1), dist.P2POp(dist.isend, y, 2)])]
elif rank == 1:
    dist.recv_object_list([None], src=0)
    [work.wait() for work in _batch_p2p([dist.P2POp(dist.irecv, x, 0)])]
    # P2POps of the unwrapped functions, built before or after installing, still validate and are recorded
    [work.wait() for work in _batch_p2p([built_before, dist.P2POp(unwrapped_irecv, y, group=pair, group_peer=1)])]
    dist.recv(x, group=pair, group_src=1)
else:
    [work.wait() for work in _batch_p2p([dist.P2POp(dist.irecv, x, 0)])]
    ops = [dist.P2POp(dist.isend, x, group=pair, group_peer=0), dist.P2POp(dist.irecv, y, group=pair, group_peer=0)]
    [work.wait() for work in _batch_p2p(ops)]
    dist.send(x, group=pair, group_dst=0)
dist.destroy_process_group()
"""


def test_recorder_sees_the_pipelining_library_and_object_lists(tmp_path):
    run = run_torchrun(["--no-python", sys.executable, "-c", LIBRARY_SCRIPT, str(tmp_path)], 3, 120, None)
    assert run.returncode == 0, run.stderr[-3000:]
    programs = load_programs(tmp_path)
    shape = {rank: [("wait", e["wait"]) if "wait" in e else [(k, peer, dtype) for k, peer, _, dtype in e["ops"]]
                    for e in events] for rank, events in programs.items()}
    assert shape == {
        # object lists: a blocking send of the size, then of the bytes; homogeneous batches run as single ops
        0: [[("send", 1, "int64")], ("wait", 0), [("send", 1, "uint8")], ("wait", 1),
            [("send", 1, "float32")], [("send", 2, "float32")], ("wait", 2), ("wait", 3)],
        # group peers are recorded as global ranks; a mixed batch is one batch
        1: [[("recv", 0, "int64")], ("wait", 0), [("recv", 0, "uint8")], ("wait", 1),
            [("recv", 0, "float32")], ("wait", 2), [("send", 2, "float32"), ("recv", 2, "float32")], ("wait", 3),
            [("recv", 2, "float32")], ("wait", 4)],
        2: [[("recv", 0, "float32")], ("wait", 0), [("send", 1, "float32"), ("recv", 1, "float32")], ("wait", 1),
            [("send", 1, "float32")], ("wait", 2)],
    }
    result = replay(programs)
    assert result.completed and not result.errors, result.description


@pytest.fixture(scope="module")
def schedule_programs(tmp_path_factory) -> Path:
    """Every schedule's traffic through the real ``TrainStep``, from one 4-rank launch."""
    out = tmp_path_factory.mktemp("schedules")
    run = run_worker("record_schedules", [str(out)], nproc=4)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.parametrize("case", [case_name(*case) for case in CASES])
def test_every_schedule_runs_on_nccl(schedule_programs, case):
    programs = load_programs(schedule_programs / case)
    assert sorted(programs) == [0, 1, 2, 3]
    assert all(any("issue" in event for event in events) for events in programs.values())  # traffic was recorded
    for strict in (False, True):
        result = replay(programs, strict=strict)
        assert not result.errors, result.errors
        assert result.completed, result.description
