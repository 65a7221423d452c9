"""Bytes per parameter per rank for DP = 1..8 with and without ZeRO-1, and step time with overlap on/off
(see megolmo/benchmarks/data_parallel.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megolmo.benchmarks.data_parallel import main  # noqa: E402

if __name__ == "__main__":
    main()
