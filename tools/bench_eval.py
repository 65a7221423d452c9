"""Evaluation cost (held-out and downstream) against a training step, tiny and ~100M models, and the TP2 logit gather it avoids (megolmo/benchmarks/evaluation.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megolmo.benchmarks.evaluation import main  # noqa: E402

if __name__ == "__main__":
    main()
