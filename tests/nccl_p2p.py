"""NCCL's point-to-point semantics for CPU tests: record each rank's p2p program on gloo, replay it as NCCL would.

Gloo buffers sends, so a schedule whose sends and receives cross between two ranks runs fine on CPU and
hangs on GPUs. NCCL runs the p2p ops between two ranks in order on one stream, ignores tags (sends and
receives between a pair match in issue order), and a send may complete only while its receive runs. The
recorder logs, per rank, the order in which batches of ops were issued and waited on; ``replay`` runs those
programs under NCCL's rules (conservatively: every send needs its receive to be running) and reports a
deadlock with the batches that are stuck.

A program is a list of events: ``{"issue": batch_id, "ops": [[kind, peer, numel, dtype], ...]}`` with kind
``"send"`` or ``"recv"`` and the peer's global rank, and ``{"wait": batch_id}`` the first time a Work of
that batch is waited on.
"""
from __future__ import annotations

import atexit
import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

Event = dict[str, Any]
Programs = dict[int, list[Event]]

# the single-op calls: (kind, peer argument, group-peer argument, blocking)
_SINGLE_OPS = {"isend": ("send", "dst", "group_dst", False), "irecv": ("recv", "src", "group_src", False),
               "send": ("send", "dst", "group_dst", True), "recv": ("recv", "src", "group_src", True)}


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


class RecordedWork:
    """A Work whose ``wait()`` is logged first: data computed after a wait may feed later sends."""

    def __init__(self, work: dist.Work, recorder: Recorder, batch: int):
        self._work = work
        self._recorder = recorder
        self._batch = batch

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        self._recorder.log_wait(self._batch)
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class Recorder:
    """Wraps torch.distributed's p2p calls (``batch_isend_irecv``, ``isend``, ``irecv``, ``send``, ``recv``).

    Both ``torch.distributed`` and ``distributed_c10d`` get the same wrapper objects, so the identity checks
    of ``P2POp``'s validation, of ``batch_isend_irecv`` and of ``pipelining.schedules._batch_p2p`` see one
    function. Calls made from inside a recorded call (the ops a batch runs, ``send`` calling ``isend``,
    ``send_object_list`` calling ``send``) are not recorded again. Install before building any ``P2POp``:
    ``_batch_p2p`` tells homogeneous batches (run as single ops) by comparing ``op`` with ``dist.isend``.
    """

    def __init__(self, path: Path):
        self.path = path
        self.events: list[Event] = []
        self._batches = 0
        self._waited: set[int] = set()
        self._inside = False
        self._originals: dict[str, Callable] = {}
        self._to_wrapper: dict[Callable, Callable] = {}

    def install(self) -> Recorder:
        self._originals = {name: getattr(c10d, name) for name in (*_SINGLE_OPS, "batch_isend_irecv", "_check_op")}
        wrappers = {name: self._single(name) for name in _SINGLE_OPS}
        wrappers["batch_isend_irecv"] = self._batch()
        # P2POps built with the unwrapped functions still validate, and run with the wrapped ones
        self._to_wrapper = {self._originals[name]: wrappers[name] for name in ("isend", "irecv")}
        wrappers["_check_op"] = lambda op: self._originals["_check_op"](self._to_wrapper.get(op, op))
        for name, wrapper in wrappers.items():
            setattr(c10d, name, wrapper)
            if hasattr(dist, name):
                setattr(dist, name, wrapper)
        return self

    def restart(self, path: Path) -> None:
        """Record a new program into ``path`` (several programs from one launch)."""
        self.path, self.events, self._waited = path, [], set()

    def dump(self) -> None:
        """Write the program so far, one event a line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(dumps_program(self.events))

    def log_wait(self, batch: int) -> None:
        if batch not in self._waited:
            self._waited.add(batch)
            self.events.append({"wait": batch})

    def _issue(self, ops: list[list]) -> int:
        batch = self._batches
        self._batches += 1
        self.events.append({"issue": batch, "ops": ops})
        return batch

    def _run_inside(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        self._inside = True
        try:
            return function(*args, **kwargs)
        finally:
            self._inside = False

    def _single(self, name: str) -> Callable:
        original = self._originals[name]
        kind, peer_arg, group_peer_arg, blocking = _SINGLE_OPS[name]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._inside:
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs).arguments
            tensor = bound["tensor"]
            batch = self._issue([[kind, _global_peer(bound.get(peer_arg), bound.get("group"),
                                                      bound.get(group_peer_arg)), tensor.numel(), _dtype(tensor)]])
            if blocking:
                self.log_wait(batch)
                return self._run_inside(original, *args, **kwargs)
            work = self._run_inside(original, *args, **kwargs)
            return None if work is None else RecordedWork(work, self, batch)

        return wrapper

    def _batch(self) -> Callable:
        original = self._originals["batch_isend_irecv"]

        @functools.wraps(original)
        def wrapper(p2p_op_list: list[dist.P2POp]) -> list[dist.Work]:
            if self._inside:
                return original(p2p_op_list)
            for op in p2p_op_list:  # batch_isend_irecv tells sends by ``op.op is isend``, the wrapper
                op.op = self._to_wrapper.get(op.op, op.op)
            batch = self._issue([["send" if op.op is c10d.isend else "recv", op.peer, op.tensor.numel(),
                                  _dtype(op.tensor)] for op in p2p_op_list])
            return [RecordedWork(work, self, batch) for work in self._run_inside(original, p2p_op_list)]

        return wrapper


def _global_peer(peer: int | None, group: dist.ProcessGroup | None, group_peer: int | None) -> int:
    """The peer's global rank; -1 for a receive from any source (NCCL has none, so it never matches)."""
    if peer is not None:
        return peer
    if group_peer is None:
        return -1
    return group_peer if group is None else dist.get_global_rank(group, group_peer)


def install_recorder(path: Path) -> Recorder:
    """Record this process's p2p program from now on; it is written to ``path`` at exit (``sys.exit`` too)."""
    recorder = Recorder(path).install()
    atexit.register(recorder.dump)
    return recorder


def dumps_program(events: list[Event]) -> str:
    return "[\n" + ",\n".join(json.dumps(event, separators=(",", ":")) for event in events) + "\n]\n"


def load_programs(directory: Path) -> Programs:
    """The ``rank{N}.json`` programs a recorded run left in ``directory``, by rank."""
    return {int(path.stem.removeprefix("rank")): json.loads(path.read_text())
            for path in sorted(Path(directory).glob("rank*.json"))}


@dataclass(frozen=True)
class Op:
    kind: str
    peer: int
    numel: int
    dtype: str

    def __str__(self) -> str:
        return f"{self.kind} {self.numel} {self.dtype} {'to' if self.kind == 'send' else 'from'} {self.peer}"


@dataclass
class _Batch:
    rank: int
    id: int
    ops: list[Op]
    after: set[int]  # batches of this rank waited on before this one was issued: its sends' data waits for them

    @property
    def key(self) -> tuple[int, int]:
        return self.rank, self.id

    def __str__(self) -> str:
        return f"rank {self.rank} batch {self.id} ({', '.join(map(str, self.ops))})"


@dataclass
class ReplayResult:
    """``completed`` when every batch of every rank completed; otherwise ``stuck`` lists the blocked batches
    at the heads of their streams and ``description`` says what each waits for. ``errors``: send/recv pairs
    whose size or dtype differ, and ops that no op of the peer matches."""

    completed: bool
    description: str
    errors: list[str]
    stuck: list[tuple[int, int]]

    @property
    def deadlocked(self) -> bool:
        return not self.completed


def replay(programs: Programs, strict: bool = False) -> ReplayResult:
    """Run the programs under NCCL's p2p rules until nothing moves.

    ``strict`` holds every batch, not only sends, behind the batches its rank waited on before issuing
    it: ProcessGroupNCCL makes its stream wait for the caller's stream, which waited on them.

    Each rank's batches queue, in issue order, on one FIFO stream per peer they touch; a batch starts when
    it heads every stream it touches and, if it sends, when the batches its rank waited on before issuing it
    have completed (a wait does not block the host on a GPU, so later issues still queue). The k-th send
    from A to B matches the k-th receive on B from A; an op completes once its batch and its partner's batch
    have started, and a batch leaves its streams when all its ops have completed.
    """
    batches: dict[tuple[int, int], _Batch] = {}
    streams: dict[tuple[int, int], list[tuple[int, int]]] = {}
    channels: dict[tuple[str, int, int], list[tuple[tuple[int, int], int]]] = {}  # (kind, src, dst): (batch, op)
    for rank, events in sorted(programs.items()):
        waited: set[int] = set()
        for event in events:
            if "wait" in event:
                waited.add(event["wait"])
                continue
            ops = [Op(*op) for op in event["ops"]]
            batch = _Batch(rank, event["issue"], ops, set(waited) if strict or any(op.kind == "send" for op in ops) else set())
            batches[batch.key] = batch
            for peer in dict.fromkeys(op.peer for op in ops):
                streams.setdefault((rank, peer), []).append(batch.key)
            for index, op in enumerate(ops):
                src, dst = (rank, op.peer) if op.kind == "send" else (op.peer, rank)
                channels.setdefault((op.kind, src, dst), []).append((batch.key, index))

    errors: list[str] = []
    partners: dict[tuple[int, int], list[tuple[int, int] | None]] = {key: [None] * len(b.ops)
                                                                      for key, b in batches.items()}
    for src, dst in sorted({(src, dst) for _, src, dst in channels}):
        sends, recvs = channels.get(("send", src, dst), []), channels.get(("recv", src, dst), [])
        for k in range(max(len(sends), len(recvs))):
            if k < len(sends) and k < len(recvs):
                (send_key, send_index), (recv_key, recv_index) = sends[k], recvs[k]
                partners[send_key][send_index], partners[recv_key][recv_index] = recv_key, send_key
                send, recv = batches[send_key].ops[send_index], batches[recv_key].ops[recv_index]
                if (send.numel, send.dtype) != (recv.numel, recv.dtype):
                    errors.append(f"{src}->{dst} message {k}: {batches[send_key]} sends {send.numel} {send.dtype}, "
                                  f"{batches[recv_key]} receives {recv.numel} {recv.dtype}")
            else:
                key, index = sends[k] if k < len(sends) else recvs[k]
                op = batches[key].ops[index]
                errors.append(f"{batches[key]}: its {op} has no matching "
                              f"{'recv' if op.kind == 'send' else 'send'} on rank {op.peer}")

    started: set[tuple[int, int]] = set()
    done: set[tuple[int, int]] = set()
    heads = {stream: 0 for stream in streams}

    def head(stream: tuple[int, int]) -> tuple[int, int] | None:
        queue = streams[stream]
        return queue[heads[stream]] if heads[stream] < len(queue) else None

    def peers(batch: _Batch) -> list[int]:
        return list(dict.fromkeys(op.peer for op in batch.ops))

    moved = True
    while moved:
        moved = False
        for key, batch in batches.items():
            if key not in started and all(head((batch.rank, peer)) == key for peer in peers(batch)) \
                    and all((batch.rank, waited) in done for waited in batch.after):
                started.add(key)
                moved = True
        for key in started - done:
            if all(partner in started for partner in partners[key]):
                done.add(key)
                moved = True
                for peer in peers(batches[key]):
                    heads[(key[0], peer)] += 1

    if len(done) == len(batches):
        return ReplayResult(True, f"All {len(batches)} batches of {len(programs)} ranks completed.", errors, [])
    stuck = sorted({key for stream in streams if (key := head(stream)) is not None})
    reasons = [_why_stuck(batches[key], batches, partners[key], started, done, head) for key in stuck]
    description = (f"Deadlock: {len(batches) - len(done)} of {len(batches)} batches never complete. "
                   + "; ".join(reasons) + ".")
    return ReplayResult(False, description, errors, stuck)


def _why_stuck(batch: _Batch, batches: dict[tuple[int, int], _Batch], partners: list[tuple[int, int] | None],
               started: set[tuple[int, int]], done: set[tuple[int, int]],
               head: Callable[[tuple[int, int]], tuple[int, int] | None]) -> str:
    if batch.key in started:
        waits = [f"{batches[p]} to start" if p else f"a partner for its {op}"
                 for op, p in zip(batch.ops, partners) if p not in started]
        return f"{batch} has started and waits for " + " and ".join(waits)
    blockers = [f"{batches[other]} on the stream to rank {peer}" for peer in dict.fromkeys(op.peer for op in batch.ops)
                if (other := head((batch.rank, peer))) != batch.key]
    if blockers:
        return f"{batch} is queued behind " + " and ".join(blockers)
    pending = [str(batches[(batch.rank, waited)]) for waited in sorted(batch.after) if (batch.rank, waited) not in done]
    return f"{batch} sends data computed after waiting on " + " and ".join(pending) + ", which never completes"
