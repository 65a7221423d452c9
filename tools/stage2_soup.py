"""Average stage-2 ingredients into the soup (megolmo + Hugging Face) and evaluate all of them side by side."""

import os
import sys

try:
    import megolmo  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is this file's parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megolmo.stage2_soup import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
