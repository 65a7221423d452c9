"""The real entry point with one more callback, which raises on one rank after a step.

``torchrun ... tests/workers/failing_callback.py <hydra overrides>`` with ``MEGOLMO_TEST_FAIL_RANK`` and
``MEGOLMO_TEST_FAIL_STEP`` in the environment.
"""
from __future__ import annotations

import os

from megolmo import train, trainer
from megolmo.callbacks import Callback

FAIL_RANK = int(os.environ["MEGOLMO_TEST_FAIL_RANK"])
FAIL_STEP = int(os.environ["MEGOLMO_TEST_FAIL_STEP"])


class FlakyLogger(Callback):
    def on_step_end(self, trainer, record) -> None:
        if trainer.ps.rank == FAIL_RANK and record.step == FAIL_STEP:
            raise OSError("disk quota exceeded\nsecond line that must not be printed")


_defaults = trainer.default_callbacks
trainer.default_callbacks = lambda *args: [*_defaults(*args), FlakyLogger()]

if __name__ == "__main__":
    train.main()
