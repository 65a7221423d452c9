"""Collectives go through ``megolmo.parallel.collectives``, which places their tensors on the group's device.

An AST scan keeps every other module off torch.distributed's collectives; the helpers themselves run on
two real gloo processes."""
from __future__ import annotations

import ast
import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megolmo.parallel import collectives
from megolmo.parallel.collectives import _check_device, device_for_backend
from tests.helpers import ROOT, free_port

FORBIDDEN = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "gather", "gather_object", "scatter",
    "scatter_object_list", "reduce", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "send_object_list", "recv_object_list", "monitored_barrier"})
DIST_MODULES = frozenset({"torch.distributed", "torch.distributed.distributed_c10d"})
PACKAGE = ROOT / "megolmo"
ALLOWED = PACKAGE / "parallel"


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` with import aliases resolved (``dist.x`` -> ``torch.distributed.x``), else None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return None if base is None else f"{base}.{node.attr}"
    return None


def direct_collectives(source: str) -> list[tuple[int, str]]:
    """(line, name) of every use of a torch.distributed collective: an import of one by name, or a
    reference to one as an attribute of the module (a call, or the function passed or stored)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if node.module in DIST_MODULES and a.name in FORBIDDEN:
                    found.append((node.lineno, f"from {node.module} import {a.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN and _dotted(node.value, aliases) in DIST_MODULES:
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_scanner_flags_direct_aliased_and_imported_collectives():
    source = "\n".join([
        "import torch",
        "import torch.distributed as d",
        "from torch import distributed as td",
        "from torch.distributed import broadcast as bc, get_rank",
        "from torch.distributed import distributed_c10d as c10d",
        "torch.distributed.all_reduce(t)",
        "d.barrier()",
        "bc(t, 0)",
        "op = td.P2POp(td.isend, t, 1)",
        "c10d.all_gather_object(out, obj)",
        "d.get_rank(); d.get_world_size(); d.new_group([0, 1]); d.is_initialized(); d.ReduceOp.MAX",
        "import torch.distributed.checkpoint as dcp",
        "dcp.save(state, checkpoint_id='x')",
    ])
    assert direct_collectives(source) == [
        (4, "from torch.distributed import broadcast"), (6, "torch.distributed.all_reduce"), (7, "d.barrier"),
        (9, "td.isend"), (10, "c10d.all_gather_object")]


def test_only_megolmo_parallel_calls_torch_distributed_collectives():
    findings = [f"{path.relative_to(ROOT)}:{line}: {name}"
                for path in sorted(PACKAGE.rglob("*.py")) if ALLOWED not in path.parents
                for line, name in direct_collectives(path.read_text())]
    assert not findings, "call these through megolmo.parallel.collectives:\n" + "\n".join(findings)


def test_device_for_backend():
    assert device_for_backend("nccl", 3) == torch.device("cuda", 3)
    assert device_for_backend("gloo", None) == torch.device("cpu")
    assert device_for_backend("gloo", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        device_for_backend("nccl", None)
    with pytest.raises(ValueError, match="mpi"):
        device_for_backend("mpi", None)


def test_check_device_names_both_devices():
    _check_device(torch.zeros(2), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"tensor on meta.*communicates on cpu"):
        _check_device(torch.empty(2, device="meta"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"tensor on cpu.*communicates on cuda:0"):
        _check_device(torch.zeros(2), torch.device("cuda", 0))


def test_single_rank_is_local():
    assert collectives.world_group() is None  # not initialized in the test process
    assert collectives.group_device(None) == torch.device("cpu")
    assert collectives.all_reduce_values([1, 2.5], "max", None) == [1.0, 2.5]
    t = torch.ones(3)
    assert collectives.all_reduce(t, None, async_op=True) is None and t.tolist() == [1.0] * 3
    out, pieces = torch.zeros(2), [torch.arange(2.0)]
    collectives.reduce_scatter(out, pieces, None)
    collectives.all_gather(gathered := [torch.zeros(2)], torch.full((2,), 7.0), None)
    assert out.tolist() == [0.0, 1.0] and gathered[0].tolist() == [7.0, 7.0]
    assert collectives.all_gather_objects("x", None) == ["x"]
    assert collectives.gather_objects("x", 0, None) == ["x"]
    assert collectives.broadcast_object("x", 0, None) == "x"
    collectives.barrier(None)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    c = collectives
    world = c.world_group()
    result: dict = {"device": str(c.group_device(world)),
                    "sum": c.all_reduce_values([rank + 1, 2.5 * rank, 2 ** 40], "sum", world),
                    "max": c.all_reduce_values([rank + 1, -rank], "max", world),
                    "all_gather_objects": c.all_gather_objects({"rank": rank}, world),
                    "gather_objects": c.gather_objects(("from", rank), 0, world),
                    "broadcast_object": c.broadcast_object(f"rank {rank}", 1, world)}
    t = torch.full((4,), float(rank + 1))
    c.all_reduce(t, world, async_op=True).wait()
    result["all_reduce"] = t.tolist()
    c.all_reduce(t, world, op="max")
    result["all_reduce_max"] = t.tolist()
    out = torch.empty(2)
    c.reduce_scatter(out, torch.arange(4.0).mul(rank + 1).chunk(2), world, async_op=True).wait()
    result["reduce_scatter"] = out.tolist()
    pieces = [torch.empty(2) for _ in range(2)]
    c.all_gather(pieces, torch.full((2,), float(rank)), world)
    result["all_gather"] = [p.tolist() for p in pieces]
    try:  # raised before anything is sent, on both ranks, so neither waits for the other
        c.all_reduce(torch.empty(2, device="meta"), world)
    except ValueError as error:
        result["wrong_device"] = str(error)
    c.barrier(world)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_collectives_on_two_gloo_ranks(tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.start_processes(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["device"] == "cpu"
        assert r["sum"] == [3.0, 2.5, 2.0 ** 41] and r["max"] == [2.0, 0.0]
        assert r["all_gather_objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["broadcast_object"] == "rank 1"
        assert r["all_reduce"] == [3.0] * 4 and r["all_reduce_max"] == [3.0] * 4
        assert r["all_gather"] == [[0.0, 0.0], [1.0, 1.0]]
        assert "tensor on meta" in r["wrong_device"] and "communicates on cpu" in r["wrong_device"]
    assert r0["gather_objects"] == [["from", 0], ["from", 1]] and r1["gather_objects"] is None
    assert r0["reduce_scatter"] == [0.0, 3.0] and r1["reduce_scatter"] == [6.0, 9.0]
