"""The real entry point with every p2p call recorded, for replay under NCCL's rules (``tests/nccl_p2p.py``).

``torchrun ... tests/workers/record_p2p.py <hydra overrides>`` with ``MEGOLMO_P2P_RECORD_DIR`` in the
environment and the repository on ``PYTHONPATH``: each rank writes ``rank{RANK}.json`` there when it exits
normally (``train.run`` ends with ``sys.exit``, which runs the atexit hook; ``os._exit`` only on failures).
"""
from __future__ import annotations

import os
from pathlib import Path

from megolmo import train
from tests.nccl_p2p import install_recorder

install_recorder(Path(os.environ["MEGOLMO_P2P_RECORD_DIR"]) / f"rank{os.environ['RANK']}.json")

if __name__ == "__main__":
    train.main()
