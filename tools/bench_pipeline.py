"""Every pipeline schedule at PP = 2, 4 and M = 4, 8, 16: step time vs one rank, bubble, live activations
(see megolmo/benchmarks/pipeline.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megolmo.benchmarks.pipeline import main  # noqa: E402

if __name__ == "__main__":
    main()
