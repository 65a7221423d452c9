"""Seconds one rank spends building its stage before the first step, fresh and resumed, before and after
restarts stopped drawing the weights (see megolmo/benchmarks/restart.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megolmo.benchmarks.restart import main  # noqa: E402

if __name__ == "__main__":
    main()
