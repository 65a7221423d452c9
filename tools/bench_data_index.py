"""Dataset start-up time and per-rank memory for corpora of 1B to 4T tokens (sparse files), against the
previous whole-epoch index (see megolmo/benchmarks/data_index.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megolmo.benchmarks.data_index import main  # noqa: E402

if __name__ == "__main__":
    main()
