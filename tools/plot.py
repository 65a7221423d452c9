"""Draw the training loss and each evaluation metric against tokens, one line per run:
`python tools/plot.py RUN_DIR [RUN_DIR ...] [--output DIR]`."""

import os
import sys

try:
    import megolmo  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is this file's parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megolmo.plots import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
