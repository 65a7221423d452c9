"""Entry point: ``python -m megolmo.train [hydra overrides]``, under torchrun, srun or mpirun alike.

The config is composed with Hydra's compose API rather than Hydra's decorated main: composition errors are
then megolmo's one-line config errors, printed once (by rank 0) and named as the root cause in torchrun's
summary, instead of Hydra's report on every rank. Every key is listed in ``docs/config.md``.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import time
import traceback

import torch.distributed

from megolmo.callbacks.base import CallbackError
from megolmo.callbacks.stop_requests import PREEMPTED_EXIT_CODE
from megolmo.errors import MegolmoConfigError, TrainingDivergedError
from megolmo.launcher_report import report_failure

REPORTER_LEAD_S = 5.0  # see let_rank_0_exit_first


def run(overrides: list[str]) -> None:
    """Train; on failure make every rank exit instead of leaving peers blocked in a collective.

    A config error is detected identically on every rank, or agreed on by all ranks at start-up
    (``parallel/agree.py``), and so is a run that diverged (``optim.max_nonfinite_steps`` non-finite steps
    in a row): rank 0 prints it in one line. Any other error is printed in full by the rank where it
    happened (a failing callback in one line naming it), which then exits at once: its closed
    connections fail the peers' pending collectives, and the peers exit with a one-line notice.
    """
    from megolmo.config import load_config
    from megolmo.errors import RendezvousError
    from megolmo.parallel.bootstrap import discover
    from megolmo.parallel.state import shutdown
    from megolmo.start_point import RunFinished
    from megolmo.trainer import Trainer

    rank = discover().rank
    exit_code = 0
    try:
        exit_code = fit(Trainer(load_config(overrides)))
    except RunFinished as finished:  # a requeued or retried job that has already done its work
        if rank == 0:
            print(f"megolmo: {finished}", flush=True)
    except (MegolmoConfigError, TrainingDivergedError) as error:  # raised alike on every rank
        line = f"megolmo: error: {error}"
        if rank == 0:
            print(line, file=sys.stderr, flush=True)
        report_failure(line)
        exit_code = 2 if isinstance(error, MegolmoConfigError) else 1
        if rank != 0:
            let_rank_0_exit_first(exit_code)
    except RendezvousError as error:  # each rank finds it out on its own: no peer to blame, none to wait for
        line = f"megolmo: rank {rank}: error: {error}"
        print(line, file=sys.stderr, flush=True)
        report_failure(line)
        exit_code = 1
    except Exception as error:  # noqa: BLE001 - the last line of defence for a multi-rank job
        peer_failed = is_peer_failure(error) or is_peer_failure(error.__cause__)
        if peer_failed:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            line = f"megolmo: rank {rank}: stopping because another rank failed ({first_line})"
        elif isinstance(error, CallbackError):  # names the callback and the hook: one line is enough
            line = f"megolmo: rank {rank}: error: {error}"
        else:
            line = f"megolmo: rank {rank} failed: {first_line_of_root(error)}"
            print(f"megolmo: rank {rank} failed:", file=sys.stderr, flush=True)
            traceback.print_exc()
        if peer_failed or isinstance(error, CallbackError):
            print(line, file=sys.stderr, flush=True)
        report_failure(line, caused_by_peer=peer_failed)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    if exit_code == PREEMPTED_EXIT_CODE:  # leave at once, as the ranks leave fit() together: a launcher that
        sys.stdout.flush()                # stops the others on the first non-zero exit finds nothing to stop
        sys.stderr.flush()
        os._exit(exit_code)
    # Gradient hooks keep the trainer, and with it the process groups, in reference cycles: free
    # them now rather than during interpreter teardown, where stopping gloo's threads can abort.
    gc.collect()
    shutdown()
    sys.exit(exit_code)


def let_rank_0_exit_first(exit_code: int) -> None:
    """An error every rank raises is printed by rank 0 alone, and launchers stop every rank at the first
    exit (srun --kill-on-bad-exit, torchrun, mpiexec): a rank that got there first would have rank 0
    killed before it prints, and the job would end without its one line of why (seen under load). So the
    other ranks wait ``REPORTER_LEAD_S`` first. The launcher's SIGTERM, once rank 0 has exited, ends the
    wait with the same exit code, so that the job's code stays the error's (2 for a config error)."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(exit_code))
    time.sleep(REPORTER_LEAD_S)


def fit(trainer) -> int:
    """Train; the exit code is ``PREEMPTED_EXIT_CODE`` when a signal stopped the job early (with a
    checkpoint), so that the launcher requeues it."""
    trainer.fit()
    return PREEMPTED_EXIT_CODE if trainer.stop_request is not None and trainer.stop_request.preempted else 0


def first_line_of_root(error: BaseException) -> str:
    """``Type: first line`` of the innermost cause: libraries (the pipeline schedule, a callback) wrap
    the error that matters in one of their own."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__


def is_peer_failure(error: BaseException | None) -> bool:
    """A collective or point-to-point operation failed because a peer died or timed out."""
    if error is None:
        return False
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return any(marker in text for marker in ("Connection closed by peer", "Connection reset by peer",
                                              "Timed out waiting", "timed out", "Broken pipe"))


USAGE = """usage: python -m megolmo.train [KEY=VALUE | GROUP=OPTION ...]

Hydra overrides, e.g. model=olmo2_1b trainer.max_steps=1000 data.paths=[/data/part-0.npy].
Every key, with its type, default and help: docs/config.md (python -m megolmo.config --markdown).
The composed config of a command: python -m megolmo.config [overrides]."""


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in overrides):
        print(USAGE)
        return
    run(overrides)


if __name__ == "__main__":
    main()
