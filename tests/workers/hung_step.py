"""The real entry point, with ``MEGOLMO_TEST_HANG_RANK`` sleeping far too long inside step
``MEGOLMO_TEST_HANG_STEP`` (the other ranks wait for it in the step's first collective).

``MEGOLMO_TEST_HANG_STEP`` may list one step per attempt of a requeued Slurm job (``3,7,7``: restart 0
hangs in step 3, restart 1 and 2 in step 7, later ones not at all)."""
from __future__ import annotations

import os
import time

from megolmo import train
from megolmo.step.train_step import TrainStep
from megolmo.trainer import Trainer

HANG_RANK = int(os.environ["MEGOLMO_TEST_HANG_RANK"])
SCHEDULE = [int(step) for step in os.environ["MEGOLMO_TEST_HANG_STEP"].split(",")]
ATTEMPT = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
HANG_STEP = SCHEDULE[ATTEMPT] if ATTEMPT < len(SCHEDULE) else None
_run, _train_step = TrainStep.run, Trainer.train_step
_step = 0


def train_step_numbered(self, step):
    global _step
    _step = step + 1
    return _train_step(self, step)


def run_and_hang(self, micro_batches, loss_tokens, lr):
    if _step == HANG_STEP and self.ps.rank == HANG_RANK:
        time.sleep(3600)  # the other ranks wait in the step's first collective
    return _run(self, micro_batches, loss_tokens, lr)


Trainer.train_step, TrainStep.run = train_step_numbered, run_and_hang

if __name__ == "__main__":
    train.main()
