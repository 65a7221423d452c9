"""Blocked time per save (synchronous vs asynchronous), checksum cost, chaos run time (see
megolmo/benchmarks/checkpoint_faults.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megolmo.benchmarks.checkpoint_faults import main  # noqa: E402

if __name__ == "__main__":
    main()
