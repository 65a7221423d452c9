"""Sharded checkpoint save/load throughput vs torch.save/torch.load (see megolmo/benchmarks/checkpoint_io.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megolmo.benchmarks.checkpoint_io import main  # noqa: E402

if __name__ == "__main__":
    main()
