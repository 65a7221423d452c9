"""Conversion and soup time and peak memory on a full-size random OLMo 2 model (see megolmo/benchmarks/convert.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megolmo.benchmarks.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
