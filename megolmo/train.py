"""Entry point: ``python -m megolmo.train [hydra overrides]``, under torchrun, srun or mpirun alike."""
from __future__ import annotations

import gc
import os
import sys
import traceback
from pathlib import Path

import hydra
import torch.distributed
from omegaconf import DictConfig

from megolmo.callbacks.base import CallbackError
from megolmo.errors import MegolmoConfigError
from megolmo.launcher_report import report_failure

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def run(cfg: DictConfig) -> None:
    """Train; on failure make every rank exit instead of leaving peers blocked in a collective.

    A config error is detected identically on every rank, or agreed on by all ranks at start-up
    (``parallel/agree.py``): rank 0 prints it in one line. Any other error is printed in full by the
    rank where it happened (a failing callback in one line naming it), which then exits at once: its
    closed connections fail the peers' pending collectives, and the peers exit with a one-line notice.
    """
    from megolmo.parallel.bootstrap import discover
    from megolmo.parallel.state import shutdown
    from megolmo.start_point import RunFinished
    from megolmo.trainer import Trainer

    rank = discover().rank
    exit_code = 0
    try:
        Trainer(cfg).fit()
    except RunFinished as finished:  # a requeued or retried job that has already done its work
        if rank == 0:
            print(f"megolmo: {finished}", flush=True)
    except MegolmoConfigError as error:
        line = f"megolmo: error: {error}"
        if rank == 0:
            print(line, file=sys.stderr, flush=True)
        report_failure(line)
        exit_code = 2
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
    # Gradient hooks keep the trainer, and with it the process groups, in reference cycles: free
    # them now rather than during interpreter teardown, where stopping gloo's threads can abort.
    gc.collect()
    shutdown()
    sys.exit(exit_code)


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


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
