"""OLMo 2's recipe in miniature: stage 1, three stage-2 ingredients, soup, SFT, export, a chat reply (make recipe-demo)."""

import os
import sys

try:
    import megolmo  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is this file's parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megolmo.recipe_demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
