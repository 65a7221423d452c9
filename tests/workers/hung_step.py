"""The real entry point, with ``MEGOLMO_TEST_HANG_RANK`` sleeping far too long inside step
``MEGOLMO_TEST_HANG_STEP`` (the other ranks wait for it in the step's first collective)."""
from __future__ import annotations

import os
import time

from megolmo import train
from megolmo.step.train_step import TrainStep

HANG_RANK, HANG_STEP = int(os.environ["MEGOLMO_TEST_HANG_RANK"]), int(os.environ["MEGOLMO_TEST_HANG_STEP"])
_run = TrainStep.run
_calls = 0


def run_and_hang(self, micro_batches, loss_tokens, lr):
    global _calls
    _calls += 1
    if _calls == HANG_STEP and self.ps.rank == HANG_RANK:
        time.sleep(3600)  # the other ranks wait in the step's first collective
    return _run(self, micro_batches, loss_tokens, lr)


TrainStep.run = run_and_hang

if __name__ == "__main__":
    train.main()
