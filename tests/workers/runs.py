"""Several training jobs one after another in one launch, as the entry point runs each: a launch costs every
rank seconds of imports and a rendezvous, so the layout tests run all their cases of one world size in one.

    python -m torch.distributed.run --nproc-per-node N tests/workers/runs.py CASES.json

CASES.json is a list of ``[name, overrides]``; rank 0 prints ``CASE_MARKER name`` before each case's console
lines. A case that fails on any rank ends every rank (exit 1) after a line naming it, as the entry point
does; the others' pending collectives fail and they exit too.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path

from megolmo.config import load_config
from megolmo.parallel.state import shutdown
from megolmo.trainer import Trainer
from tests.helpers import CASE_MARKER


def main(cases_file: str) -> None:
    for name, overrides in json.loads(Path(cases_file).read_text()):
        if os.environ.get("RANK", "0") == "0":
            print(f"{CASE_MARKER}{name}", flush=True)
        try:
            Trainer(load_config(overrides)).fit()
        except BaseException:  # noqa: BLE001 - a failed case ends the launch, on every rank
            print(f"case {name} failed on rank {os.environ.get('RANK', 0)}:", file=sys.stderr, flush=True)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        gc.collect()  # the trainer's gradient hooks hold it, and its process groups, in cycles
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
