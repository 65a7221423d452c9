"""Pack chat JSONL into SFT files: `python tools/prepare_sft.py --tokenizer T --output DIR --seq-len N INPUT...`."""

import os
import sys

try:
    import megolmo  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is this file's parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megolmo.data.sft import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
