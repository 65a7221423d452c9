"""The real entry point, with one rank's transformer blocks raising after a few forwards.

Used by the failure test: ``torchrun ... tests/workers/failing_stage.py <hydra overrides>`` with
``MEGOLMO_TEST_FAIL_RANK`` and ``MEGOLMO_TEST_FAIL_AFTER`` in the environment.
"""
from __future__ import annotations

import os

from megolmo import train
from megolmo.model.block import Block

FAIL_RANK = int(os.environ["MEGOLMO_TEST_FAIL_RANK"])
FAIL_AFTER = int(os.environ["MEGOLMO_TEST_FAIL_AFTER"])
_calls = 0
_forward = Block.forward


def failing_forward(self, x):
    global _calls
    _calls += 1
    if int(os.environ["RANK"]) == FAIL_RANK and _calls > FAIL_AFTER:
        raise ValueError(f"injected failure on rank {FAIL_RANK}")
    return _forward(self, x)


Block.forward = failing_forward

if __name__ == "__main__":
    train.main()
