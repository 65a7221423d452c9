"""Tell the launcher why a rank failed, in megolmo's own one line.

torchrun gives each worker a file (``TORCHELASTIC_ERROR_FILE``) for its failure and prints, as the job's
root cause, the failure with the earliest timestamp; without a file it reports ``error_file: <N/A>``
and no reason. Every failing rank writes the line it printed (or, for a config error that rank 0
alone prints, the same line on every rank). Timestamps are whole seconds: a real failure is stamped a
second early and a rank that stops only because a peer failed a second late, so neither it nor a rank
torchrun killed before it wrote anything (stamped when torchrun reads) can tie with the rank that
really failed.
"""
from __future__ import annotations

import json
import os
import time

ERROR_FILE = "TORCHELASTIC_ERROR_FILE"


def report_failure(message: str, caused_by_peer: bool = False) -> None:
    """Record ``message`` as this rank's failure, where the launcher asked for one (no-op elsewhere)."""
    path = os.environ.get(ERROR_FILE)
    if not path:
        return
    stamp = int(time.time()) + (1 if caused_by_peer else -1)
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(stamp)}}}
    with open(path, "w") as f:
        json.dump(record, f)
