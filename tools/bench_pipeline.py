"""Pipeline step time and bubble fraction for PP = 1, 2, 4 and M = 4, 8, 16 (see megolmo/benchmarks/pipeline.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megolmo.benchmarks.pipeline import main  # noqa: E402

if __name__ == "__main__":
    main()
