"""The pipeline schedules users choose with ``parallel.pipeline_schedule``, each a schedule of
``torch.distributed.pipelining``, with the rules each one puts on the layout, checked at start-up.

| name | library class | chunks per rank | bubble (ideal) |
|---|---|---|---|
| ``1f1b`` | ``Schedule1F1B`` | 1 | (P-1)/M |
| ``interleaved_1f1b`` | ``ScheduleInterleaved1F1B`` | V | (P-1)/(V M) |
| ``interleaved_zero_bubble`` | ``ScheduleInterleavedZeroBubble`` | V | below 1F1B: weight passes fill it |
| ``zbv`` | ``ScheduleZBVZeroBubble`` | 2, in a V | below 1F1B: weight passes fill it |
| ``gpipe`` | ``ScheduleGPipe`` | 1 | (P-1)/M, but holds all M activations |

The library batches each send with the receive it must overlap (1F1B's steady state) or posts every
receive before the computation that needs it (the action-list runtime), so a send never waits behind
its peer's own send on NCCL's in-order streams: ``tests/test_nccl_p2p.py`` replays every schedule's
recorded traffic under those rules.
"""
from __future__ import annotations

from typing import Any

from megolmo.errors import MegolmoConfigError

SCHEDULES = {  # name -> class of torch.distributed.pipelining, imported only by a pipelined job (schedule_class)
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "interleaved_zero_bubble": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "gpipe": "ScheduleGPipe",
}
SINGLE_CHUNK = {"gpipe", "1f1b"}
SPLIT_BACKWARD = {"interleaved_zero_bubble", "zbv"}  # separate input (I) and weight (W) backward passes


def schedule_class(name: str) -> Any:
    """The library's class: importing ``torch.distributed.pipelining`` pulls in ``torch._dynamo`` (about 2 s
    per process), which a job without a pipeline need not pay."""
    from torch.distributed import pipelining

    return getattr(pipelining, SCHEDULES[name])


def schedule_name(requested: str | None, virtual: int) -> str:
    """The configured schedule; by default 1F1B, interleaved when there are virtual chunks."""
    name = requested or ("interleaved_1f1b" if virtual > 1 else "1f1b")
    if name not in SCHEDULES:
        raise MegolmoConfigError(f"parallel.pipeline_schedule={name}: choose one of {', '.join(SCHEDULES)}")
    return name


def check_schedule_layout(name: str, pipeline: int, virtual: int, num_micro_batches: int,
                          compiled: bool = False) -> None:
    """One-line errors for a layout the schedule cannot run, before anything is allocated."""
    if name in SPLIT_BACKWARD and compiled:
        raise MegolmoConfigError(f"parallel.pipeline_schedule={name} splits each backward into input- and "
                                 "weight-gradient passes, which compiled blocks cannot do: set trainer.compile=false "
                                 "or choose 1f1b / interleaved_1f1b")
    if name in SINGLE_CHUNK and virtual > 1:
        raise MegolmoConfigError(f"parallel.pipeline_schedule={name} runs one chunk per rank; got "
                                 f"parallel.virtual_pipeline={virtual} (use interleaved_1f1b or "
                                 "interleaved_zero_bubble)")
    if name == "zbv" and virtual != 2:
        raise MegolmoConfigError(f"parallel.pipeline_schedule=zbv needs parallel.virtual_pipeline=2; got {virtual}")
    if name == "1f1b" and num_micro_batches < pipeline:
        raise MegolmoConfigError(f"parallel.pipeline_schedule=1f1b needs at least parallel.pipeline={pipeline} "
                                 f"micro-batches; got {num_micro_batches} (trainer.global_batch_size / "
                                 "(data-parallel size x trainer.micro_batch_size))")
    if name in ("interleaved_1f1b", "interleaved_zero_bubble"):
        rounds = max(1, num_micro_batches // pipeline)
        if num_micro_batches % rounds:
            raise MegolmoConfigError(
                f"parallel.pipeline_schedule={name} needs a number of micro-batches that divides into "
                f"rounds of parallel.pipeline={pipeline}; got {num_micro_batches} (trainer.global_batch_size / "
                "(data-parallel size x trainer.micro_batch_size))")


def stage_indexes(name: str, pp_rank: int, pipeline: int, virtual: int) -> list[int]:
    """Global chunk indexes a pipeline rank holds, in its local order: looped (r, r+P, ...) or, for
    ZBV, a V (r and 2P-1-r), so that the last chunk shares a rank with the first."""
    if name == "zbv":
        return [pp_rank, 2 * pipeline - 1 - pp_rank]
    return [v * pipeline + pp_rank for v in range(virtual)]


def theoretical_bubble(name: str, pipeline: int, micro_batches: int, virtual: int) -> float:
    """The ideal idle-over-compute fraction of 1F1B-like schedules, (P-1)/(V M); zero-bubble schedules
    are measured against it (their goal is to beat it)."""
    return (pipeline - 1) / ((1 if name in SINGLE_CHUNK else virtual) * micro_batches)
