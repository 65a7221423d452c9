"""A hang watchdog (``trainer.step_timeout_s``): a step or a save that runs longer dumps every thread's
stack into the run directory and ends the process, so a launcher's restart takes over instead of the job
waiting out the process-group timeout, or forever where no collective is involved.

The timer is ``faulthandler.dump_traceback_later``: a C thread that needs neither the GIL nor a responsive
main thread, so it fires even when the hang holds the interpreter. It exits with status 1. Every rank runs
its own: a rank blocked in a collective waiting for the hung one is in the same overlong step, and its
timer fires too. Each process writes ``hangs/rank<R>-pid<P>.txt``: a line naming what it was doing, then,
if the timer fired, faulthandler's ``Timeout`` line and the stacks. A process that ends normally removes
its file; files of killed processes that hold no dump are removed at the next start.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
from pathlib import Path
from typing import IO, Iterator

DUMP_MARKER = "Timeout ("  # faulthandler's first line


class HangWatchdog:
    def __init__(self, timeout_s: float | None, run_dir: Path, rank: int):
        self.timeout_s = timeout_s
        self.rank = rank
        self.path = run_dir / "hangs" / f"rank{rank}-pid{os.getpid()}.txt"
        self._file: IO[str] | None = None
        if timeout_s is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._remove_files_without_dumps()
            self._file = open(self.path, "w")

    def _remove_files_without_dumps(self) -> None:
        for old in self.path.parent.glob(f"rank{self.rank}-pid*.txt"):
            if DUMP_MARKER not in old.read_text(errors="replace"):
                old.unlink()

    @contextlib.contextmanager
    def watching(self, what: str) -> Iterator[None]:
        """Allow ``what`` (e.g. ``step 12``) ``timeout_s`` seconds."""
        if self._file is None:
            yield
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"rank {self.rank}: {what}, started {datetime.datetime.now().isoformat(timespec='seconds')}"
                         f" (trainer.step_timeout_s={self.timeout_s:g})\n")
        self._file.flush()
        faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=self._file, exit=True)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        if self._file is not None:
            faulthandler.cancel_dump_traceback_later()
            self._file.close()
            self._file = None
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # other ranks' files, or a dump, keep it
                self.path.parent.rmdir()
