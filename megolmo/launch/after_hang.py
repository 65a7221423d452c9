"""Whether a job the hang watchdog ended should run again: ``python -m megolmo.launch.after_hang RUN_DIR --since T``.

A hang is usually the cluster's (a stuck link, a bad node), so a requeued job that resumes from the last
checkpoint goes on. A hang that repeats before any new checkpoint is likely the job's own, and requeueing it
would only burn ``trainer.step_timeout_s`` of the allocation per attempt: such a job is left to fail.
``slurm/train.sbatch`` asks this after ``srun`` fails. The exit status is 0 for "requeue", 1 otherwise;
after a hang, one line says which and why. ``T`` (seconds since the epoch) is the job's start: dumps older
than it are earlier attempts'.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from megolmo.checkpoint.manager import CheckpointManager
from megolmo.watchdog import DUMP_MARKER

# In hangs/: the checkpoint the job was requeued from after its last hang ("" for none).
REQUEUED_AT = "requeued-at-checkpoint"


def hang_dumps(run_dir: Path, since: float) -> list[Path]:
    """The stack dumps this attempt's watchdogs wrote, by rank."""
    hangs = run_dir / "hangs"
    dumps = [path for path in hangs.glob("rank*-pid*.txt")
             if path.stat().st_mtime >= since and DUMP_MARKER in path.read_text(errors="replace")]
    return sorted(dumps, key=lambda path: int(path.name[4:].split("-")[0]))


def describe(dumps: list[Path]) -> str:
    """``rank 1: step 3, started ... (trainer.step_timeout_s=8)`` (the first dump's header) and where the rest are."""
    header = dumps[0].read_text(errors="replace").splitlines()[0]
    ranks = ", ".join(path.name.split("-")[0][4:] for path in dumps)
    return f"{header}; stacks of ranks {ranks} in {dumps[0].parent}"


def decide(run_dir: Path, since: float) -> tuple[bool, str | None]:
    """(requeue?, the line saying so, None where nothing hung); records the checkpoint a requeue resumes from."""
    dumps = hang_dumps(run_dir, since)
    if not dumps:
        return False, None
    latest = CheckpointManager(run_dir, keep_last=1).latest()
    resume_from = latest.name if latest is not None else ""
    record = run_dir / "hangs" / REQUEUED_AT
    shown = resume_from or "the start (no checkpoint yet)"
    if record.exists() and record.read_text() == resume_from:
        return False, (f"megolmo: hung again with no checkpoint since the last requeue ({shown}): "
                       f"not requeueing; {describe(dumps)}")
    record.write_text(resume_from)
    return True, f"megolmo: hung ({describe(dumps)}); a requeued job resumes from {shown}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megolmo.launch.after_hang", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--since", type=float, required=True, help="the job's start, in seconds since the epoch")
    args = parser.parse_args(argv)
    requeue, line = decide(args.run_dir, args.since)
    if line is not None:
        print(line, flush=True)
    return 0 if requeue else 1


if __name__ == "__main__":
    sys.exit(main())
