"""Stop early, all ranks after the same step, with a checkpoint: on SIGUSR1/SIGTERM (a scheduler's
preemption or time-limit warning) and when ``trainer.time_limit`` would run out.

A signal reaches one rank, several, or all, at different moments; a clock runs out at slightly different
times on each rank. So every rank only notes its own reason, and after each step the ranks agree with one
tiny all-reduce (MAX) whether to stop; they then save this step's checkpoint together (``Checkpointing``
sees ``trainer.stop_request``) and leave the loop. A signalled job exits with ``PREEMPTED_EXIT_CODE``,
on which ``slurm/train.sbatch`` requeues it; a job that ran out of its time limit exits 0.
"""
from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from megolmo.callbacks.base import Callback, StepRecord
from megolmo.errors import MegolmoConfigError
from megolmo.parallel.collectives import all_reduce_values, world_group

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; slurm/train.sbatch requeues on it
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str | int | float) -> float:
    """``3h50m``, ``90m``, ``1d2h``, ``45s`` or a number of seconds."""
    if isinstance(text, (int, float)) or str(text).replace(".", "", 1).isdigit():
        return float(text)
    match = _DURATION.fullmatch(str(text).strip())
    if not str(text).strip() or match is None:
        raise MegolmoConfigError(f"trainer.time_limit={text}: expected a duration such as 3h50m, 90m, 45s "
                                 "or a number of seconds")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def process_started() -> float:
    """``time.monotonic()`` at this process's start (Linux), so that a time limit includes the start-up
    (imports, rendezvous, model build) that the scheduler's clock counts too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return time.monotonic()
    return time.monotonic() - max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


@dataclass(frozen=True)
class StopRequest:
    step: int
    reason: str
    preempted: bool  # a signal: the job should be requeued (exit PREEMPTED_EXIT_CODE), not ended


class StopRequests(Callback):
    def __init__(self, time_limit_s: float | None, started: float):
        self.time_limit_s = time_limit_s
        self.started = started  # time.monotonic() when the job's process began
        self.received: str | None = None
        self.longest_step = 0.0
        self.longest_save = 0.0
        self._last = 0.0
        self._save_started = 0.0
        self._previous: dict[int, object] = {}

    def on_start(self, trainer) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note_signal)
            signal.siginterrupt(signum, False)  # restart system calls: a blocked collective must not see EINTR
        self._last = time.monotonic()

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name  # acted on at the next step boundary

    def on_step_end(self, trainer, record: StepRecord) -> None:
        now = time.monotonic()
        self.longest_step = max(self.longest_step, now - self._last)
        self._last = now
        out_of_time = self.time_limit_s is not None and (
            now - self.started + self.longest_step + self.longest_save >= self.time_limit_s)
        signalled, timed_out = all_reduce_values([float(self.received is not None), float(out_of_time)], "max",
                                                 world_group())
        if signalled:
            trainer.stop_request = StopRequest(record.step, f"{self.received or 'a signal on another rank'}",
                                               preempted=True)
        elif timed_out and record.step < trainer.last_step:
            trainer.stop_request = StopRequest(
                record.step, f"trainer.time_limit={trainer.cfg.trainer.time_limit} leaves no room for another "
                             "step and a save", preempted=False)

    def before_save(self, trainer, step: int) -> None:
        self._save_started = time.monotonic()

    def after_save(self, trainer, step: int, path) -> None:
        self.longest_save = max(self.longest_save, time.monotonic() - self._save_started,
                                trainer.checkpoints.longest_save_s)  # a stop's save is synchronous: whole saves count
        self._last = time.monotonic()  # a save is not part of the next step's time

    def on_end(self, trainer) -> None:
        self._restore()

    def on_failure(self, trainer, error: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
