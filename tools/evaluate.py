"""Evaluate a checkpoint or Hugging Face model on held-out sets: `python tools/evaluate.py CKPT --lm-sets NAME=FILE ...`."""

import os
import sys

try:
    import megolmo  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is this file's parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megolmo.evaluation.offline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
