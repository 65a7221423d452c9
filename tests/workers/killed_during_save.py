"""The real entry point, dying (as if killed) in the middle of its second checkpoint save, after the
checkpoint files are written but before the save is complete."""
from __future__ import annotations

import os

from megolmo import train
from megolmo.checkpoint import manager

_saves = 0
_real_save = manager.dcp.save


def save_then_die(*args, **kwargs):
    global _saves
    _saves += 1
    result = _real_save(*args, **kwargs)
    if _saves == 2:
        os._exit(9)
    return result


manager.dcp.save = save_then_die

if __name__ == "__main__":
    train.main()
