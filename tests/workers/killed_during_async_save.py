"""The real entry point, with ``MEGOLMO_TEST_KILL_RANK`` killed (``os._exit``, no clean-up) while its second
asynchronous save is in flight: its checkpoint files are written, the checkpoint is not yet published, and
training has gone on meanwhile."""
from __future__ import annotations

import os
import time

from megolmo import train
from megolmo.checkpoint.manager import CheckpointManager

KILL_RANK = int(os.environ["MEGOLMO_TEST_KILL_RANK"])
_finish = CheckpointManager._finish
_saves = 0


def finish_or_die(self, job, written) -> None:
    global _saves
    _saves += 1
    if written is not None and _saves == 2 and int(os.environ["RANK"]) == KILL_RANK:
        written.result()
        time.sleep(1.0)  # training takes a few more steps while this save is unpublished
        os._exit(9)
    _finish(self, job, written)


CheckpointManager._finish = finish_or_die

if __name__ == "__main__":
    train.main()
